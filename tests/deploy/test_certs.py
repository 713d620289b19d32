"""Certificates and site keys: SANs, the chain to the CA, keys Flower can load, the CLI."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcore.cli import main
from fedcore.crypto import certs as c
from fedcore.deploy.pki import layout, site_names, write_certs
from fedcore.errors import ConfigError, InvalidMessage


@pytest.fixture(scope="module")
def ca() -> c.Pem:
    return c.make_ca()


def test_server_certificate_names_given_sans_and_loopback(ca):
    server = c.make_server_certificate(
        ca, sans=["superlink.example.org", "10.1.2.3", "2001:db8::7"]
    )
    sans = c.certificate_sans(server.certificate)
    assert sans[:3] == ("superlink.example.org", "10.1.2.3", "2001:db8::7")
    assert set(c.LOOPBACK_SANS) <= set(sans)
    cert = x509.load_pem_x509_certificate(server.certificate)
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)] == [
        "10.1.2.3",
        "2001:db8::7",
        "127.0.0.1",
        "::1",
    ]
    assert ext.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]


def test_chain_verifies_against_its_ca_and_not_another(ca):
    server = c.make_server_certificate(ca, sans=["10.0.0.5"])
    c.verify_certificate(ca.certificate, server.certificate)
    c.verify_certificate(ca.certificate, server.certificate, host="10.0.0.5")
    c.verify_certificate(ca.certificate, server.certificate, host="127.0.0.1")
    with pytest.raises(InvalidMessage, match="not 'elsewhere.example.org'"):
        c.verify_certificate(ca.certificate, server.certificate, host="elsewhere.example.org")
    other = c.make_ca()  # same subject name, different key: the signature must not verify
    with pytest.raises(InvalidMessage, match="not signed by the CA"):
        c.verify_certificate(other.certificate, server.certificate)
    with pytest.raises(InvalidMessage):  # a CA certificate is not a TLS server certificate
        c.verify_certificate(ca.certificate, ca.certificate)


def test_chain_verifies_with_openssl(ca, tmp_path):
    server = c.make_server_certificate(ca, sans=["superlink.example.org"])
    (tmp_path / "ca.crt").write_bytes(ca.certificate)
    (tmp_path / "s.crt").write_bytes(server.certificate)
    try:
        done = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                "ca.crt",
                "-verify_hostname",
                "superlink.example.org",
                "s.crt",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("openssl is not installed")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("bad", ["https://host", "host:9092", "two words", "", "-bad-.example"])
def test_bad_san_is_a_config_error(ca, bad):
    with pytest.raises(ConfigError, match="SAN"):
        c.make_server_certificate(ca, sans=[bad])


def test_auth_keys_are_openssh_p384_and_load(tmp_path):
    pair = c.auth_keypair(comment="fedcore-site-0")
    c.check_auth_private_key(pair.private_key)
    c.check_auth_public_key(pair.public_key)
    assert pair.public_key.startswith(b"ecdsa-sha2-nistp384 ")
    private = serialization.load_ssh_private_key(pair.private_key, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key(pair.public_key)
    assert public.public_numbers() == private.public_key().public_numbers()
    # What Flower itself does with them (flwr supernode register / flower-supernode).
    from flwr.cli.supernode.register import try_load_public_key

    (tmp_path / "k.pub").write_bytes(pair.public_key)
    assert try_load_public_key(tmp_path / "k.pub")
    with pytest.raises(ConfigError):
        c.check_auth_public_key(
            b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
        )
    with pytest.raises(ConfigError):
        c.check_auth_private_key(b"not a key")


def test_write_certs_layout_modes_and_no_overwrite(tmp_path):
    files = write_certs(tmp_path / "pki", sans=["superlink.example.org"], names=site_names(2))
    assert [s.name for s in files.sites] == ["site-0", "site-1"]
    for path in files.files():
        assert path.exists()
    for private in (files.ca_key, files.superlink_key, *(s.private_key for s in files.sites)):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    c.verify_certificate(
        files.ca_certificate.read_bytes(),
        files.superlink_certificate.read_bytes(),
        host="superlink.example.org",
    )
    for site in files.sites:
        c.check_auth_private_key(site.private_key.read_bytes())
        c.check_auth_public_key(site.public_key.read_bytes())
    before = {p: p.read_bytes() for p in files.files()}
    with pytest.raises(ConfigError, match="never overwrites"):
        write_certs(tmp_path / "pki", sans=[], names=site_names(2))
    assert {p: p.read_bytes() for p in files.files()} == before


def test_site_names_are_checked(tmp_path):
    with pytest.raises(ConfigError):
        layout(tmp_path, ["../escape"])
    with pytest.raises(ConfigError):
        layout(tmp_path, ["a", "a"])
    with pytest.raises(ConfigError):
        site_names(0)


def test_cli_writes_files_and_prints_register_commands(tmp_path, capsys):
    assert (
        main(["certs", str(tmp_path / "pki"), "--san", "superlink.example.org", "--sites", "2"])
        == 0
    )
    out = capsys.readouterr().out
    for i in range(2):
        assert (
            f"flwr supernode register {tmp_path / 'pki' / 'sites' / f'site-{i}.pub'} fedcore" in out
        )
    assert "--enable-supernode-auth" in out and "--disable-runtime-dependency-installation" in out
    assert 'address = "superlink.example.org:9092"' in out
    # A second time into the same folder: one line, exit 2, nothing overwritten.
    assert main(["certs", str(tmp_path / "pki")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "never overwrites" in err


def test_cli_bad_san_exits_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "certs", str(tmp_path / "x"), "--san", "http://x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "SAN" in done.stderr
    assert not (tmp_path / "x" / "ca.key").exists()


def test_add_site_reuses_the_ca_and_its_certificate_verifies_against_it(tmp_path, capsys):
    """A site joins an existing federation (issue 25 point 6): its key pair is written beside the
    others, the CA and the SuperLink certificate stay as they were, and the secure-aggregation
    certificate issued for it verifies against the CA the SuperLink's certificate chains to."""
    from fedcore.crypto.signing import verify_key_of

    pki = tmp_path / "pki"
    assert main(["certs", str(pki), "--san", "superlink.example.org", "--sites", "2"]) == 0
    files = layout(pki, site_names(2))
    before = {p: p.read_bytes() for p in files.files()}
    signing = verify_key_of(bytes(range(32)))  # a site's Ed25519 public key, fixed seed
    capsys.readouterr()
    argv = ["certs", str(pki), "--add-site", "hospital-c", "--signing-key", signing.hex()]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert {p: p.read_bytes() for p in files.files()} == before  # nothing given out changes
    new = layout(pki, ["hospital-c"]).sites[0]
    c.check_auth_private_key(new.private_key.read_bytes())
    c.check_auth_public_key(new.public_key.read_bytes())
    assert stat.S_IMODE(new.private_key.stat().st_mode) == 0o600
    name, key = c.verify_signing_certificate(
        files.ca_certificate.read_bytes(), (pki / "sites" / "hospital-c.secagg.crt").read_bytes()
    )
    assert (name, key) == ("hospital-c", signing)
    c.verify_certificate(  # the same CA still verifies the SuperLink the site will connect to
        files.ca_certificate.read_bytes(),
        files.superlink_certificate.read_bytes(),
        host="superlink.example.org",
    )
    assert f"flwr supernode register {new.public_key} fedcore" in out
    assert "partition-id=2" in out and "num-partitions=3" in out  # the next partition of 3
    assert "--superlink superlink.example.org:9092" in out  # from the SuperLink's SANs
    assert "sites=3" in out

    # Never overwrites; a folder without a CA is refused; a bad key writes nothing.
    assert main(["certs", str(pki), "--add-site", "hospital-c"]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert main(["certs", str(tmp_path / "empty"), "--add-site", "x"]) == 2
    assert "holds no CA" in capsys.readouterr().err
    assert main(["certs", str(pki), "--add-site", "d", "--signing-key", "zz"]) == 2
    assert "64 hex digits" in capsys.readouterr().err
    assert not (pki / "sites" / "d.key").exists()


def test_add_site_refuses_a_folder_whose_superlink_certificate_another_ca_signed(tmp_path):
    from fedcore.deploy.pki import add_sites

    files = write_certs(tmp_path / "pki", sans=[], names=site_names(1))
    other = c.make_ca()
    files.ca_certificate.chmod(0o644)
    files.ca_certificate.write_bytes(other.certificate)  # the CA swapped under the SuperLink
    with pytest.raises(ConfigError, match="does not chain to"):
        add_sites(tmp_path / "pki", names=["late"])
    assert not (tmp_path / "pki" / "sites" / "late.key").exists()
