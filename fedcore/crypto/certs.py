"""Certificates and keys for a Flower deployment: a CA, the SuperLink's TLS certificate, site keys.

Theory of operation. Flower 1.41's deployment engine secures two things separately:

- **Transport (TLS).** The SuperLink serves every API on one port with a certificate signed by a
  CA the SuperNodes and the ``flwr`` CLI trust (``--root-certificates`` on a SuperNode,
  ``root-certificates`` in a connection). TLS authenticates the *server only*; there is no mutual
  TLS. The certificate must name every address it is reached at in its subject alternative names
  (SANs), the loopback ones included: a SuperLink bound to ``0.0.0.0`` starts its own SuperExec
  against ``127.0.0.1:<port>`` and verifies the certificate there.
- **Node authentication.** Each site holds an EC key pair on a NIST curve (P-384 here, the curve
  Flower's documentation uses) in OpenSSH format. The operator registers the public half with
  ``flwr supernode register``; a SuperLink started with ``--enable-supernode-auth`` admits only
  nodes that sign with a registered private key.

- **Secure-aggregation identity** (ACTIVE mode). Each site's Ed25519 signing key (derived on the
  site from its secure-aggregation key) is bound to the site's name by a certificate the same CA
  issues (:func:`issue_signing_certificate`, an extendedKeyUsage of its own); sites accept a peer's
  key only through such a certificate, so a shared registry folder grants nothing by itself.

Every key comes from the operating system's CSPRNG (``cryptography``'s default). Verification
raises :class:`~fedcore.errors.InvalidMessage`; it never returns a bool. Bad input (a SAN that is
neither a host name nor an IP address, a file that is not a PEM certificate) raises
:class:`~fedcore.errors.ConfigError`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.errors import ConfigError, InvalidMessage

__all__ = [
    "LOOPBACK_SANS",
    "AuthKeyPair",
    "Pem",
    "auth_keypair",
    "certificate_sans",
    "check_auth_private_key",
    "check_auth_public_key",
    "issue_signing_certificate",
    "make_ca",
    "make_server_certificate",
    "parse_san",
    "verify_certificate",
    "verify_signing_certificate",
]

LOOPBACK_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""SANs every SuperLink certificate carries: its own SuperExec connects over loopback."""

_HOSTNAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_TLS_CURVE = ec.SECP256R1()
_AUTH_CURVE = ec.SECP384R1()


@dataclass(frozen=True, slots=True)
class Pem:
    """A private key and its certificate, both PEM-encoded (the key unencrypted, PKCS#8)."""

    key: bytes
    certificate: bytes


@dataclass(frozen=True, slots=True)
class AuthKeyPair:
    """A site's node-authentication key pair, in the OpenSSH formats Flower reads."""

    private_key: bytes  # "-----BEGIN OPENSSH PRIVATE KEY-----", unencrypted
    public_key: bytes  # "ecdsa-sha2-nistp384 AAAA... comment"


def parse_san(text: str) -> x509.GeneralName:
    """A SAN entry from text: an IPv4/IPv6 address, else a DNS name.

    Raises :class:`ConfigError` for text that is neither (a URL, a port, spaces).
    """
    value = text.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not value or len(value) > 253 or not _HOSTNAME.match(value):
        raise ConfigError(
            f"SAN {text!r} is neither an IP address nor a DNS name "
            "(give a bare host, no scheme or port)"
        )
    return x509.DNSName(value.rstrip("."))


def _names(sans: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for text in sans:
        name = parse_san(text)
        if name not in names:
            names.append(name)
    return names


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_certificate(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"{what} is not a PEM certificate: {exc}") from exc


def _load_ec_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{what} must be an EC private key, got {type(key).__name__}")
    return key


def make_ca(*, common_name: str = "fedcore federation CA", valid_days: int = 3650) -> Pem:
    """A self-signed CA that may sign end-entity certificates only (path length 0).

    Raises :class:`ConfigError` if ``valid_days`` is not positive.
    """
    if valid_days < 1:
        raise ConfigError(f"valid_days must be >= 1, got {valid_days}")
    key = ec.generate_private_key(_TLS_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Pem(key=_key_pem(key), certificate=certificate.public_bytes(serialization.Encoding.PEM))


def make_server_certificate(
    ca: Pem,
    *,
    sans: Sequence[str],
    common_name: str = "fedcore superlink",
    valid_days: int = 825,
) -> Pem:
    """A TLS server certificate for the SuperLink, signed by ``ca``, naming ``sans``.

    ``sans`` are host names or IP addresses; :data:`LOOPBACK_SANS` are always added.
    Raises :class:`ConfigError` for a bad SAN, a CA that does not load, or a bad ``valid_days``.
    """
    if valid_days < 1:
        raise ConfigError(f"valid_days must be >= 1, got {valid_days}")
    names = _names([*sans, *LOOPBACK_SANS])
    ca_key = _load_ec_key(ca.key, "the CA key")
    ca_cert = _load_certificate(ca.certificate, "the CA certificate")
    key = ec.generate_private_key(_TLS_CURVE)
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Pem(key=_key_pem(key), certificate=certificate.public_bytes(serialization.Encoding.PEM))


def certificate_sans(certificate: bytes) -> tuple[str, ...]:
    """The SANs of a PEM certificate as text (DNS names and IP addresses), in order.

    Raises :class:`ConfigError` if ``certificate`` is not a PEM certificate.
    """
    cert = _load_certificate(certificate, "the certificate")
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(name.value) for name in ext if isinstance(name, x509.DNSName | x509.IPAddress))


def verify_certificate(
    ca_certificate: bytes, certificate: bytes, *, host: str | None = None
) -> None:
    """Return None if ``certificate`` chains to ``ca_certificate`` (and names ``host``, if given).

    Checks the signature, the validity period, that the issuer is a CA, that the certificate is a
    TLS server certificate, and the SAN. Raises :class:`InvalidMessage` otherwise, and
    :class:`ConfigError` for input that is not a PEM certificate.
    """
    ca = _load_certificate(ca_certificate, "the CA certificate")
    cert = _load_certificate(certificate, "the certificate")
    if cert.issuer != ca.subject:
        raise InvalidMessage(
            f"certificate issuer {cert.issuer.rfc4514_string()!r} is not the CA "
            f"{ca.subject.rfc4514_string()!r}"
        )
    try:
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise InvalidMessage("the CA certificate is not marked as a CA (basicConstraints)")
    except x509.ExtensionNotFound as exc:
        raise InvalidMessage("the CA certificate has no basicConstraints extension") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise InvalidMessage(
            f"certificate was not signed by the CA: {exc or type(exc).__name__}"
        ) from exc
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise InvalidMessage(
            f"certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now"
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise InvalidMessage("certificate has no extendedKeyUsage (expected serverAuth)") from exc
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        raise InvalidMessage("certificate is not for TLS servers (no serverAuth usage)")
    if host is not None:
        wanted = parse_san(host)
        if str(wanted.value) not in certificate_sans(certificate):
            raise InvalidMessage(
                f"certificate names {', '.join(certificate_sans(certificate))}, not {host!r}"
            )


def auth_keypair(*, comment: str = "") -> AuthKeyPair:
    """A new P-384 node-authentication key pair in OpenSSH format (what Flower loads)."""
    key = ec.generate_private_key(_AUTH_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        public += b" " + comment.encode()
    return AuthKeyPair(private_key=private, public_key=public + b"\n")


def check_auth_private_key(data: bytes) -> None:
    """Return None if ``data`` is an OpenSSH EC private key on a NIST curve (as Flower requires).

    Raises :class:`ConfigError` otherwise.
    """
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not an unencrypted OpenSSH private key: {exc}") from exc
    _require_nist_ec(key)


def check_auth_public_key(data: bytes) -> None:
    """Return None if ``data`` is an OpenSSH EC public key on a NIST curve (``flwr supernode
    register`` accepts only those). Raises :class:`ConfigError` otherwise."""
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not an OpenSSH public key: {exc}") from exc
    _require_nist_ec(key)


def _require_nist_ec(key: object) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        raise ConfigError(f"node keys must be EC keys on a NIST curve, got {type(key).__name__}")
    if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ConfigError(f"node keys must be on a NIST curve, got {key.curve.name}")


# ----------------------------------------------------------------------------- secure aggregation

SECAGG_SIGNING_USAGE = x509.ObjectIdentifier("2.25.203113567498411329914395823212546093377")
"""extendedKeyUsage of a site's secure-aggregation certificate (an OID under the UUID arc 2.25,
so it needs no registration): the key signs SecAgg adverts and survivor sets, nothing else."""


def issue_signing_certificate(
    ca: Pem, *, site: str, public_key: bytes, valid_days: int = 825
) -> bytes:
    """A certificate, signed by ``ca``, binding the site name ``site`` (its subject's common name)
    to the site's Ed25519 secure-aggregation public key (its subject key), for that use only.

    Raises :class:`ConfigError` for a public key that is not 32 bytes, an empty site name, a CA
    that does not load, or a bad ``valid_days``.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if valid_days < 1:
        raise ConfigError(f"valid_days must be >= 1, got {valid_days}")
    if not site:
        raise ConfigError("a secure-aggregation certificate needs a site name")
    try:
        subject_key = Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError as exc:
        raise ConfigError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}") from exc
    ca_key = _load_ec_key(ca.key, "the CA key")
    ca_cert = _load_certificate(ca.certificate, "the CA certificate")
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
        .issuer_name(ca_cert.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([SECAGG_SIGNING_USAGE]), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def verify_signing_certificate(ca_certificate: bytes, certificate: bytes) -> tuple[str, bytes]:
    """The site name and Ed25519 public key a secure-aggregation certificate binds, after checking
    that ``ca_certificate`` signed it, that it is valid now and made for this use.

    Raises :class:`InvalidMessage` for a certificate that fails any check (or does not parse: it
    comes from a shared folder), :class:`ConfigError` for a CA certificate that does not load.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    ca = _load_certificate(ca_certificate, "the CA certificate")
    try:
        cert = x509.load_pem_x509_certificate(certificate)
    except ValueError as exc:
        raise InvalidMessage(f"not a PEM certificate: {exc}") from exc
    if cert.issuer != ca.subject:
        raise InvalidMessage("certificate was not issued by the federation CA")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise InvalidMessage("certificate was not signed by the federation CA") from exc
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise InvalidMessage("certificate is not valid now")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise InvalidMessage("certificate is not for secure-aggregation signing") from exc
    if SECAGG_SIGNING_USAGE not in usages:
        raise InvalidMessage("certificate is not for secure-aggregation signing")
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidMessage("certificate does not hold an Ed25519 key")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not str(names[0].value):
        raise InvalidMessage("certificate names no site")
    return str(names[0].value), key.public_bytes_raw()
