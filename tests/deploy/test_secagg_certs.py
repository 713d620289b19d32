"""Certified secure-aggregation identities: a site shows its signing key, the CA holder certifies
it with ``fedcore certs --issue``, and only the CA's certificate for that key verifies."""

from __future__ import annotations

import pytest

from fedcore.cli import main
from fedcore.crypto import certs as c
from fedcore.crypto.signing import verify_key_of
from fedcore.errors import InvalidMessage
from fedcore.federation.site import registry as secagg_registry
from fedcore.federation.site.store import SiteStore


def test_a_site_shows_its_key_and_the_ca_certifies_it(tmp_path, capsys):
    pki, state = tmp_path / "pki", tmp_path / "state"
    assert main(["certs", str(pki), "--sites", "2"]) == 0
    printed = capsys.readouterr().out
    assert 'state-dir="/var/lib/fedcore"' in printed and "--show-signing-key" in printed
    assert main(["certs", str(state), "--show-signing-key", "--site-id", "1"]) == 0
    key = capsys.readouterr().out.strip()
    store = SiteStore(state, 1)
    assert store.key_path.exists() and store.journal_path.exists()  # the journal came first
    assert bytes.fromhex(key) == secagg_registry.signing_public_key(store)
    assert main(["certs", str(pki), "--issue", "site-1", "--signing-key", key]) == 0
    certificate = (pki / "sites" / "site-1.secagg.crt").read_bytes()
    ca = (pki / "ca.crt").read_bytes()
    assert c.verify_signing_certificate(ca, certificate) == ("site-1", bytes.fromhex(key))
    # Never overwritten: a second --issue for the same name is refused.
    assert main(["certs", str(pki), "--issue", "site-1", "--signing-key", key]) == 2


def test_only_the_federation_ca_and_the_signing_usage_verify(tmp_path):
    ca, other = c.make_ca(), c.make_ca()
    key = bytes(range(32))
    public = verify_key_of(key)
    good = c.issue_signing_certificate(ca, site="hospital-a", public_key=public)
    assert c.verify_signing_certificate(ca.certificate, good) == ("hospital-a", public)
    with pytest.raises(InvalidMessage, match="not issued by|not signed by"):
        c.verify_signing_certificate(other.certificate, good)
    tls = c.make_server_certificate(ca, sans=["x.example.org"]).certificate
    with pytest.raises(InvalidMessage, match="not for secure-aggregation signing"):
        c.verify_signing_certificate(ca.certificate, tls)
    with pytest.raises(InvalidMessage, match="not a PEM"):
        c.verify_signing_certificate(ca.certificate, b"junk")
