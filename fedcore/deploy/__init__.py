"""Running fedcore on Flower's deployment engine (SuperLink, SuperNodes, ``flwr run``).

fedcore builds no transport of its own: Flower's processes carry every message, over TLS, between
nodes the SuperLink has authenticated. This package prepares and supervises them:

- :mod:`fedcore.deploy.pki`: the certificate folder (CA, SuperLink certificate, site key pairs)
  written by ``fedcore certs``; the keys come from :mod:`fedcore.crypto.certs`.
- :mod:`fedcore.deploy.commands`: Flower's command lines, built in one place.
- :mod:`fedcore.deploy.flwr_home`: a private ``FLWR_HOME`` with its connection, the environment
  for Flower's programs, run-config files, free ports.
- :mod:`fedcore.deploy.processes`: starting processes and stopping every one of them (and their
  descendants) by process id.
- :mod:`fedcore.deploy.local`: a whole deployment on loopback (``fedcore deploy-local``).

The recipe for several hosts is docs/deployment.md.
"""
