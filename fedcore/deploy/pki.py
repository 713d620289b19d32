"""The certificate folder of a federation: what ``fedcore certs DIR`` writes, and where.

::

    DIR/ca.crt               the CA certificate: give it to every site and every flwr user
    DIR/ca.key               the CA's private key: keep it offline, it signs SuperLink certificates
    DIR/superlink.crt        the SuperLink's TLS certificate (SANs: the given names + loopback)
    DIR/superlink.key        its private key: stays on the SuperLink host
    DIR/sites/NAME.key       a site's node-authentication private key (OpenSSH): that site only
    DIR/sites/NAME.pub       its public key: registered with `flwr supernode register`

With ACTIVE-mode secure aggregation, each site's secure-aggregation certificate (binding the site
name to its Ed25519 signing key, which only the site holds) is issued later, once the site has told
its public key (``fedcore certs STATE_DIR --show-signing-key --site-id I`` on the site)::

    DIR/sites/NAME.secagg.crt   written by `fedcore certs DIR --issue NAME --signing-key HEX`

Private keys are written with mode 0600. The keys themselves are made by
:mod:`fedcore.crypto.certs` (``fedcore.crypto`` is the only package that imports
``cryptography.hazmat``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcore.crypto.certs import (
    Pem,
    auth_keypair,
    issue_signing_certificate,
    make_ca,
    make_server_certificate,
)
from fedcore.deploy.commands import TlsFiles
from fedcore.errors import ConfigError

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class SiteKeyFiles:
    """One site's node-authentication key files."""

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True, slots=True)
class CertLayout:
    """The files of a certificate folder (see the module docstring)."""

    directory: Path
    ca_certificate: Path
    ca_key: Path
    superlink_certificate: Path
    superlink_key: Path
    sites: tuple[SiteKeyFiles, ...]

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(
            ca_certificate=self.ca_certificate,
            certificate=self.superlink_certificate,
            key=self.superlink_key,
        )

    def files(self) -> list[Path]:
        site_files = [f for s in self.sites for f in (s.private_key, s.public_key)]
        return [
            self.ca_certificate,
            self.ca_key,
            self.superlink_certificate,
            self.superlink_key,
            *site_files,
        ]


def site_names(count: int) -> tuple[str, ...]:
    """``site-0 .. site-{count-1}``. Raises :class:`ConfigError` unless ``count >= 1``."""
    if count < 1:
        raise ConfigError(f"the number of sites must be >= 1, got {count}")
    return tuple(f"site-{i}" for i in range(count))


def layout(directory: Path, names: Sequence[str]) -> CertLayout:
    """Where the files of a certificate folder are (nothing is read or written).

    Raises :class:`ConfigError` for a site name that is not a plain file name, or a repeated one.
    """
    for name in names:
        if not _SITE_NAME.match(name):
            raise ConfigError(
                f"site name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must be distinct, got {list(names)}")
    directory = directory.expanduser().resolve()
    return CertLayout(
        directory=directory,
        ca_certificate=directory / "ca.crt",
        ca_key=directory / "ca.key",
        superlink_certificate=directory / "superlink.crt",
        superlink_key=directory / "superlink.key",
        sites=tuple(
            SiteKeyFiles(
                name, directory / "sites" / f"{name}.key", directory / "sites" / f"{name}.pub"
            )
            for name in names
        ),
    )


def write_certs(
    directory: Path, *, sans: Sequence[str], names: Sequence[str], valid_days: int = 825
) -> CertLayout:
    """Create a CA, a SuperLink certificate for ``sans`` (plus loopback) and a key pair per site.

    Refuses to overwrite: if any of the files exists, raises :class:`ConfigError` and writes
    nothing. Also raises it for a bad SAN or site name (before anything is written).
    """
    files = layout(directory, names)
    existing = [str(p) for p in files.files() if p.exists()]
    if existing:
        raise ConfigError(
            f"{existing[0]} already exists; `fedcore certs` never overwrites keys (a new CA would "
            "lock every site out). Choose an empty folder"
        )
    ca = make_ca()
    server = make_server_certificate(ca, sans=sans, valid_days=valid_days)  # checks the SANs
    pairs = [auth_keypair(comment=f"fedcore-{name}") for name in names]
    (files.directory / "sites").mkdir(parents=True, exist_ok=True)
    _write(files.ca_certificate, ca.certificate, private=False)
    _write(files.ca_key, ca.key, private=True)
    _write(files.superlink_certificate, server.certificate, private=False)
    _write(files.superlink_key, server.key, private=True)
    for site, pair in zip(files.sites, pairs, strict=True):
        _write(site.private_key, pair.private_key, private=True)
        _write(site.public_key, pair.public_key, private=False)
    return files


def _write(path: Path, data: bytes, *, private: bool) -> None:
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # whatever the umask


def issue_secagg_certificate(
    directory: Path, *, name: str, signing_key: str, valid_days: int = 825
) -> Path:
    """``DIR/sites/NAME.secagg.crt``: the CA of ``directory`` certifies that site ``name`` holds the
    Ed25519 key ``signing_key`` (64 hex digits). Never overwrites. Raises :class:`ConfigError`."""
    files = layout(directory, [name])
    try:
        ca = Pem(key=files.ca_key.read_bytes(), certificate=files.ca_certificate.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the CA in {files.directory}: {exc}") from None
    try:
        public = bytes.fromhex(signing_key)
    except ValueError:
        raise ConfigError(f"--signing-key must be hex, got {signing_key!r}") from None
    certificate = issue_signing_certificate(ca, site=name, public_key=public, valid_days=valid_days)
    path = files.directory / "sites" / f"{name}.secagg.crt"
    if path.exists():
        raise ConfigError(f"{path} already exists; `fedcore certs` never overwrites")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, certificate, private=False)
    return path
