"""The registry of site signing keys behind ACTIVE-mode secure aggregation.

Theory of operation (Bonawitz et al., CCS 2017, section 6). Against a server that deviates from the
protocol, every key advert and every client's view of the survivor set is signed with the site's
long-term Ed25519 key, and every party checks the signatures against a registry of public keys
that the server cannot write: otherwise the server could invent sybil clients, collect their
shares and unmask one honest site's input. The guarantee needs exactly that: the registry holds
one key per client id, written by the site that owns it, and the server has no write access.

Here the registry is a folder of files ``<node id>.ed25519.pub`` (the 32-byte public key, hex):

- A site derives its signing seed from its secure-aggregation site key (HKDF, its own label, so
  the seed never equals any per-round secret) and publishes its public key itself, once, when the
  server asks it to enrol; an existing entry holding another key is refused, never overwritten.
- Sites and the server read the folder before checking signatures; a client id without an entry
  cannot take part in an ACTIVE-mode round.

Where the folder lives: in simulation every site and the server share this machine, so it is
``<run record>/sites/secagg-registry``. In a deployment it must be a folder that every site and the
server can read and that only the sites write (a shared mount, or copies distributed by the
operators), named by the node config's ``secagg-registry`` at each site and found at
``<run record>/sites/secagg-registry`` at the server. Flower's node ids are assigned by the
SuperLink when a SuperNode connects, so entries are made at enrolment, not before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcore.config import Settings
from fedcore.crypto.agreement import derive_key
from fedcore.crypto.signing import PUBLIC_BYTES, verify_key_of
from fedcore.errors import ConfigError
from fedcore.federation.site_privacy import run_sites_dir, site_state_dir

FOLDER = "secagg-registry"
SUFFIX = ".ed25519.pub"


def registry_dir(settings: Settings, node_config: Mapping[str, Any]) -> Path:
    """The registry folder: the node config's ``secagg-registry``, else ``<state dir>/secagg-registry``."""
    if folder := node_config.get("secagg-registry"):
        return Path(str(folder))
    return site_state_dir(settings, node_config) / FOLDER


def server_registry_dir(settings: Settings) -> Path:
    """Where the server reads the registry: ``<run record>/sites/secagg-registry``."""
    return run_sites_dir(settings) / FOLDER


def signing_seed(site_key: bytes) -> bytes:
    """The site's Ed25519 seed, derived from its secure-aggregation site key."""
    return derive_key(site_key, salt=b"fedcore.secagg.signing", info=b"fedcore/secagg/v1/ed25519")


def publish(folder: Path, node_id: int, site_key: bytes) -> bytes:
    """Write node ``node_id``'s public signing key into the registry (once); return the key.

    Raises ConfigError if the entry exists with another key (it is left as it was).
    """
    public = verify_key_of(signing_seed(site_key))
    path = folder / f"{int(node_id)}{SUFFIX}"
    try:
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(public.hex())
            try:
                os.link(tmp, path)  # fails if another process published first: no overwrite
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot publish to the secagg registry {str(folder)!r}: {exc}") from exc
    if _read(path) != public:
        raise ConfigError(f"registry entry {str(path)!r} holds another site's key; not overwritten")
    return public


def load_registry(folder: Path) -> dict[int, bytes]:
    """Every entry of the registry folder (empty if there is none). Malformed entries are skipped:
    a client id without a valid key cannot join an ACTIVE-mode round."""
    entries: dict[int, bytes] = {}
    for path in folder.glob(f"*{SUFFIX}") if folder.is_dir() else []:
        name = path.name.removesuffix(SUFFIX)
        key = _read(path)
        if name.isdigit() and key is not None:
            entries[int(name)] = key
    return entries


def _read(path: Path) -> bytes | None:
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return key if len(key) == PUBLIC_BYTES else None
