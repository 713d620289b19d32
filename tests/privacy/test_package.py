"""fedcore.privacy's face: each name exported once, loaded on first use."""

import subprocess
import sys

import fedcore.privacy as privacy


def test_the_privacy_package_loads_its_names_lazily_and_exports_each_once():
    assert sorted(privacy.__all__) == sorted(privacy._HOME)
    for name in privacy.__all__:
        assert getattr(privacy, name).__name__ == name
    probe = "import sys, fedcore.privacy.relations; print('dp_accounting' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # a light module of the package stays light
