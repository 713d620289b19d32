"""Which packages the wheel holds (the rest of the metadata is in pyproject.toml).

The library is every ``fedcore*`` package. The Flower app's components, ``clients/`` and
``server/`` at the top of the checkout (what ``flwr run .`` loads), are installed once more under
``fedcore/_app/`` (the same files, mapped, not copied), so that ``fedcore simulate`` from an
installed fedcore finds its app in any folder (:func:`fedcore.federation.simulation.engine.find_app_dir`).
"""

from setuptools import find_packages, setup

APP = {"fedcore._app.clients": "clients", "fedcore._app.server": "server"}

setup(packages=[*find_packages(include=["fedcore", "fedcore.*"]), *APP], package_dir=APP)
