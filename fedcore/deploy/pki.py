"""The certificate folder of a federation: what ``fedcore certs DIR`` writes, and where.

::

    DIR/ca.crt               the CA certificate: give it to every site and every flwr user
    DIR/ca.key               the CA's private key: keep it offline, it signs SuperLink certificates
    DIR/superlink.crt        the SuperLink's TLS certificate (SANs: the given names + loopback)
    DIR/superlink.key        its private key: stays on the SuperLink host
    DIR/sites/NAME.key       a site's node-authentication private key (OpenSSH): that site only
    DIR/sites/NAME.pub       its public key: registered with `flwr supernode register`

A site joins later with ``fedcore certs DIR --add-site NAME`` (:func:`add_sites`): its key pair
is written beside the others and the CA in ``DIR`` is reused, so nothing already given out
changes.

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


def existing_sites(directory: Path) -> list[str]:
    """The names of the sites whose public key is in ``DIR/sites``, sorted."""
    folder = directory.expanduser().resolve() / "sites"
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.pub") if _SITE_NAME.match(p.stem))


def add_sites(
    directory: Path,
    *,
    names: Sequence[str],
    signing_keys: Sequence[str] = (),
    valid_days: int = 825,
) -> tuple[CertLayout, list[Path]]:
    """Add sites to the federation whose CA is in ``directory``: a node-authentication key pair
    each (``DIR/sites/NAME.key``, ``.pub``), and with ``signing_keys`` (one per name, hex) each
    site's secure-aggregation certificate signed by that CA (:func:`issue_secagg_certificate`).

    The CA, its key and the SuperLink's certificate are reused, never replaced, so the running
    SuperLink and the sites already registered are untouched: the new site is registered with
    ``flwr supernode register`` like the others. Returns the new sites' layout and the
    certificates written. Raises :class:`ConfigError`, writing nothing, for a folder without a CA
    (or whose SuperLink certificate that CA did not sign), a site that exists already, a bad name,
    or a wrong number of signing keys.
    """
    files = layout(directory, names)
    if signing_keys and len(signing_keys) != len(names):
        raise ConfigError(
            f"--signing-key is given {len(signing_keys)} times for {len(names)} new sites; "
            "give one per --add-site, in the same order, or none"
        )
    _check_ca(files)
    for key in signing_keys:  # checked before anything is written
        try:
            if len(bytes.fromhex(key)) != 32:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--signing-key must be 64 hex digits, got {key!r}") from None
    taken = [str(p) for s in files.sites for p in (s.private_key, s.public_key) if p.exists()]
    taken += [
        str(path)
        for name in names[: len(signing_keys)]
        if (path := files.directory / "sites" / f"{name}.secagg.crt").exists()
    ]
    if taken:
        raise ConfigError(f"{taken[0]} already exists; `fedcore certs` never overwrites keys")
    pairs = [auth_keypair(comment=f"fedcore-{name}") for name in names]
    (files.directory / "sites").mkdir(parents=True, exist_ok=True)
    for site, pair in zip(files.sites, pairs, strict=True):
        _write(site.private_key, pair.private_key, private=True)
        _write(site.public_key, pair.public_key, private=False)
    issued = [
        issue_secagg_certificate(directory, name=name, signing_key=key, valid_days=valid_days)
        for name, key in zip(names, signing_keys, strict=False)
    ]
    return files, issued


def _check_ca(files: CertLayout) -> None:
    """The folder holds a CA, and the SuperLink's certificate (if there) chains to it."""
    from fedcore.crypto.certs import verify_certificate
    from fedcore.errors import InvalidMessage

    missing = [p for p in (files.ca_certificate, files.ca_key) if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{files.directory} holds no CA ({missing[0].name} is missing): `fedcore certs DIR "
            "--add-site` adds sites to the folder that `fedcore certs DIR` made"
        )
    if files.superlink_certificate.is_file():
        try:
            verify_certificate(
                files.ca_certificate.read_bytes(), files.superlink_certificate.read_bytes()
            )
        except InvalidMessage as exc:
            raise ConfigError(
                f"{files.superlink_certificate} does not chain to {files.ca_certificate}: {exc}"
            ) from exc


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
