"""The registry of site signing keys behind ACTIVE-mode secure aggregation, and the certificates
that make an entry count.

Theory of operation (Bonawitz et al., CCS 2017, section 6). Against a server that deviates from the
protocol, every key advert and every client's view of the survivor set is signed with the site's
long-term Ed25519 key, and every party checks the signatures against a registry of public keys:
otherwise the server could invent sybil clients, collect their shares and unmask one honest site's
input. The registry must therefore say *which site* holds each key, in a way neither the server nor
another site can forge.

Here the trust root is the federation CA that ``fedcore certs`` creates (the same CA as TLS), and
each entry of the registry folder is

- ``<node id>.ed25519.pub``: the site's public signing key (hex), and
- ``<node id>.secagg.crt``: a certificate from that CA binding the site's *name* (the common name,
  the name ``fedcore certs`` knows the site by) to that key (:func:`fedcore.crypto.certs.issue_signing_certificate`).

A site counts a peer only if its entry's certificate verifies against the CA named by the site's
own node config (``secagg-ca``; never the run config), holds the entry's key, and no other entry
carries the same site name (one name, one node: a site that copies its own certificate to extra
node ids loses them all). So writing into the shared folder grants nothing: without the CA's
signature an entry is ignored, and a round offering such a participant is refused.

A site derives its signing seed from its secure-aggregation site key (HKDF, its own label, so the
seed never equals any per-round secret) and publishes its entry itself, write-once, when the server
asks it to enrol and before advertising. Its certificate is the node config's
``secagg-certificate`` (default ``<state-dir>/site-<id>.secagg.cert.pem``), issued by the CA holder
with ``fedcore certs DIR --issue NAME --signing-key HEX`` (the site tells its public key in the
refusal it sends while it has none). In simulation, where one person plays every party, a per-run
CA under the run record (``<run record>/sites/secagg-ca.pem``) issues each site's certificate on
first use.

Where the folder lives: in simulation ``<run record>/sites/secagg-registry``; in a deployment a
folder every site and the server can read (a shared mount, or copies distributed by the
operators), named by the node config's ``secagg-registry`` at each site and read at
``<run record>/sites/secagg-registry`` by the server. The server filters entries with the CA
certificate it finds in the folder (``ca.crt``), if any, only to avoid offering rounds the sites
would refuse; it is not what protects the sites. Flower's node ids are assigned by the SuperLink
when a SuperNode connects, so entries are made at enrolment, not before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore._files import create_exclusive, read_private
from fedcore.config import Settings
from fedcore.crypto.agreement import derive_key
from fedcore.crypto.certs import (
    Pem,
    issue_signing_certificate,
    make_ca,
    verify_signing_certificate,
)
from fedcore.crypto.signing import PUBLIC_BYTES, verify_key_of
from fedcore.errors import ConfigError, InvalidMessage
from fedcore.federation.site.folders import is_simulated, run_sites_dir, site_state_dir
from fedcore.federation.site.store import SiteStore

FOLDER = "secagg-registry"
SUFFIX = ".ed25519.pub"
CERT_SUFFIX = ".secagg.crt"
CA_FILE = "ca.crt"
SIMULATION_CA = "secagg-ca.pem"


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


def publish(folder: Path, node_id: int, site_key: bytes, certificate: bytes | None = None) -> bytes:
    """Write node ``node_id``'s public signing key (and its certificate) into the registry, once;
    return the key.

    Raises ConfigError if an entry exists with another key or certificate (left as it was).
    """
    public = verify_key_of(signing_seed(site_key))
    path = folder / f"{int(node_id)}{SUFFIX}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            create_exclusive(path, public.hex().encode(), mode=0o644)
        if _read(path) != public:
            raise ConfigError(
                f"registry entry {str(path)!r} holds another site's key; not overwritten"
            )
        cert_path = folder / f"{int(node_id)}{CERT_SUFFIX}"
        if certificate is not None and not cert_path.exists():
            create_exclusive(cert_path, certificate, mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot publish to the secagg registry {str(folder)!r}: {exc}") from exc
    if certificate is not None and _read_cert(folder, node_id) != certificate:
        raise ConfigError(
            f"registry entry of node {node_id} holds another certificate; not overwritten"
        )
    return public


def load_registry(
    folder: Path, *, ca: bytes | None = None, expected: frozenset[str] | None = None
) -> dict[int, bytes]:
    """The registry's entries, node id to public key (empty if there is no folder).

    With ``ca`` (a PEM certificate), an entry counts only with a certificate from that CA for its
    key, and entries whose certificates name the same site are all dropped. With ``expected``
    (the site names a site's operator pinned), only entries certified for one of those names
    count: a CA that mints a certificate under a new name does not add a peer. Malformed or
    uncertified entries are skipped (a peer without an entry cannot join an ACTIVE round).
    Raises ConfigError for a ``ca`` that does not load.
    """
    entries: dict[int, bytes] = {}
    for path in folder.glob(f"*{SUFFIX}") if folder.is_dir() else []:
        name = path.name.removesuffix(SUFFIX)
        key = _read(path)
        if name.isdigit() and key is not None:
            entries[int(name)] = key
    if ca is None:
        return entries
    owners: dict[int, str] = {}
    for node, key in entries.items():
        cert = _read_cert(folder, node)
        if cert is None:
            continue
        try:
            site, certified = verify_signing_certificate(ca, cert)
        except InvalidMessage:
            continue
        if certified == key and (expected is None or site in expected):
            owners[node] = site
    names = Counter(owners.values())
    return {node: entries[node] for node, site in owners.items() if names[site] == 1}


def folder_ca(folder: Path) -> bytes | None:
    """The CA certificate the registry folder carries (``ca.crt``), if any: what the server uses to
    filter entries. A site never trusts it; its CA comes from its node config."""
    try:
        return (folder / CA_FILE).read_bytes()
    except OSError:
        return None


def _read(path: Path) -> bytes | None:
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return key if len(key) == PUBLIC_BYTES else None


def _read_cert(folder: Path, node_id: int) -> bytes | None:
    try:
        return (folder / f"{int(node_id)}{CERT_SUFFIX}").read_bytes()
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class SiteIdentity:
    """What ACTIVE mode trusts at a site: the federation CA (``ca``, from the node config), and
    where the site's own certificate is. ``issuer``: in simulation only, the per-run CA (key and
    certificate) that issues the site's certificate on first use."""

    ca: Path | None
    certificate: Path
    issuer: Path | None = None
    expected: frozenset[str] | None = None  # node config secagg-expected-sites: pinned names

    def ca_certificate(self) -> bytes:
        """The trust root. Raises ConfigError when the node config names none."""
        if self.issuer is not None:
            return simulation_ca(self.issuer).certificate
        if self.ca is None:
            raise ConfigError(
                "ACTIVE-mode secure aggregation needs the federation CA: set the node config's "
                "'secagg-ca' to the path of ca.crt"
            )
        try:
            return self.ca.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the node config's 'secagg-ca': {exc}") from exc

    def site_certificate(self, site_key: bytes) -> bytes:
        """This site's certificate, checked against the CA and the site's own signing key (in
        simulation, issued now if there is none). Raises ConfigError while it has none, telling
        the public key to certify."""
        public = verify_key_of(signing_seed(site_key))
        ca = self.ca_certificate()
        if not self.certificate.exists() and self.issuer is not None:
            issued = issue_signing_certificate(
                simulation_ca(self.issuer),
                site=self.certificate.name.split(".")[0],
                public_key=public,
            )
            try:
                create_exclusive(self.certificate, issued, mode=0o644)
            except OSError as exc:
                raise ConfigError(f"cannot store the site's certificate: {exc}") from exc
        try:
            certificate = self.certificate.read_bytes()
        except OSError:
            raise ConfigError(
                f"this site has no secure-aggregation certificate at {str(self.certificate)!r}; have "
                "the federation CA issue one: fedcore certs DIR --issue <this site's name> "
                f"--signing-key {public.hex()}"
            ) from None
        try:
            _, certified = verify_signing_certificate(ca, certificate)
        except InvalidMessage as exc:
            raise ConfigError(f"this site's certificate does not verify: {exc}") from None
        if certified != public:
            raise ConfigError(
                "this site's certificate is for another signing key; have the federation CA "
                f"issue one for {public.hex()}"
            )
        return certificate


def site_identity(
    settings: Settings, node_config: Mapping[str, Any], store: SiteStore
) -> SiteIdentity:
    """The node config's ``secagg-ca`` and ``secagg-certificate`` (default: the store's
    certificate file); in simulation, the per-run CA under the run record issues the certificate."""
    certificate = Path(str(node_config.get("secagg-certificate") or store.certificate_path))
    expected = expected_sites(node_config)
    if ca := node_config.get("secagg-ca"):
        return SiteIdentity(ca=Path(str(ca)), certificate=certificate, expected=expected)
    if is_simulated(node_config) and settings.out:
        issuer = run_sites_dir(settings) / SIMULATION_CA
        return SiteIdentity(None, certificate, issuer=issuer, expected=expected)
    return SiteIdentity(ca=None, certificate=certificate, expected=expected)


EXPECTED_SITES = "secagg-expected-sites"


def expected_sites(node_config: Mapping[str, Any]) -> frozenset[str] | None:
    """The node config's ``secagg-expected-sites``: the site names (comma-separated, as
    ``fedcore certs`` issued them) this site accepts as peers in ACTIVE mode, its own included;
    None when unset (every name the CA certified). Raises ConfigError for an empty list."""
    raw = node_config.get(EXPECTED_SITES)
    if raw is None:
        return None
    names = frozenset(n.strip() for n in str(raw).split(",") if n.strip())
    if not names:
        raise ConfigError(
            f"the node config's {EXPECTED_SITES!r} is {raw!r}: give the site names this site "
            "accepts as peers, comma-separated, or leave it unset"
        )
    return names


def simulation_ca(path: Path) -> Pem:
    """The per-run CA of a simulation (key and certificate in one 0600 file), made on first use;
    its certificate is also put in the registry folder as ``ca.crt`` for the server."""
    if not path.exists():
        made = make_ca(common_name="fedcore simulation secagg CA", valid_days=30)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            create_exclusive(path, made.key + made.certificate)
        except OSError as exc:
            raise ConfigError(f"cannot create the simulation CA {str(path)!r}: {exc}") from exc
    data = read_private(path)
    cut = data.find(b"-----BEGIN CERTIFICATE-----")
    if cut < 0:
        raise ConfigError(f"{str(path)!r} holds no CA certificate")
    ca = Pem(key=data[:cut], certificate=data[cut:])
    registry = path.parent / FOLDER
    try:
        if not (registry / CA_FILE).exists():
            registry.mkdir(parents=True, exist_ok=True)
            create_exclusive(registry / CA_FILE, ca.certificate, mode=0o644)
    except OSError as exc:
        raise ConfigError(
            f"cannot publish to the secagg registry {str(registry)!r}: {exc}"
        ) from exc
    return ca


def signing_public_key(store: SiteStore) -> bytes:
    """The site's public signing key (its key and journal are created if this is its first use):
    what the federation CA certifies for the site."""
    from fedcore.federation.site.journal import RoundJournal

    key, _ = RoundJournal.open_site(store)
    return verify_key_of(signing_seed(key))


def certify_site(store: SiteStore, ca: Pem, *, site: str) -> Path:
    """Issue site ``site`` its certificate from ``ca`` and store it at the store's certificate
    path (never replacing one); for an operator who holds the CA and the site's state folder on
    one machine (``fedcore deploy-local``). Returns the path. Raises ConfigError."""
    certificate = issue_signing_certificate(ca, site=site, public_key=signing_public_key(store))
    try:
        create_exclusive(store.certificate_path, certificate, mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot store the site's certificate: {exc}") from exc
    return store.certificate_path
