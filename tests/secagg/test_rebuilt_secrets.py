"""A rebuilt secret is checked against its exact bytes, and a culprit is named only on evidence
(issue 21, point 5).

Two colluding holders of a dropped client's mask key rewrite their shares. X25519 clamps its
scalar (RFC 7748, section 5), so 2**5 byte strings share one public key: a check of the form
``x25519_public(key) == advertised key`` accepts a reconstruction the colluders shifted in a
clamped bit, and the shares they fitted to it make the decoder name honest holders. Each test
plays that on :func:`fedcore.secagg.recovery.rebuild_mask_key`, the server's check.
"""

from __future__ import annotations

from fedcore.crypto import CryptoRng
from fedcore.crypto.agreement import x25519_public
from fedcore.secagg import shamir
from fedcore.secagg.messages import KeyAdvert
from fedcore.secagg.recovery import rebuild_mask_key

P = shamir.PRIME
OWNER = 50
T = 4
# Holders sorted so that the colluders' forged subset is the decoder's first try after the honest
# path fails: colluder 1, honest 2 (off the forged polynomial), colluder 3, then honest 4..8.
COLLUDERS = (1, 3)
HONEST = (2, 4, 5, 6)  # t + 2 holders in all: decoding corrects one wrong share, not two
ON_FORGED = (4, 5)  # the t - 2 honest holders the forged polynomial passes through


def _interpolate(points: dict[int, int], x: int) -> int:
    """The value at ``x`` of the polynomial of degree < len(points) through ``points`` (x: y)."""
    total = 0
    for xi, yi in points.items():
        num, den = 1, 1
        for xj in points:
            if xj != xi:
                num = num * (x - xj) % P
                den = den * (xi - xj) % P
        total = (total + yi * num * pow(den, P - 2, P)) % P
    return total


def _clamped(raw: bytes) -> bytes:
    """The scalar X25519 uses (RFC 7748, section 5): the form a client shares its mask key in."""
    return bytes([raw[0] & 248, *raw[1:31], (raw[31] & 127) | 64])


def _honest_round() -> tuple[bytes, KeyAdvert, dict[int, int]]:
    private = _clamped(CryptoRng.from_seed(1, purpose="tests.rebuilt-secrets").bytes(32))
    (shares,) = shamir.split(
        [private],
        holders=sorted(COLLUDERS + HONEST),
        threshold=T,
        rng=CryptoRng.from_seed(2, purpose="tests.rebuilt-secrets"),
    )
    advert = KeyAdvert(OWNER, b"r" * 16, bytes(32), x25519_public(private), bytes(32))
    return private, advert, shares


def _forge(shares: dict[int, int], shift: int) -> dict[int, int]:
    """The colluders add g to their shares, where g has degree < t, g(0) = ``shift``, and g
    vanishes on ON_FORGED: f + g then fits t shares (theirs and ON_FORGED) and rebuilds
    f(0) + shift."""
    c1, c2 = COLLUDERS
    g = {0: shift, **{h + 1: 0 for h in ON_FORGED}, c1 + 1: 12345}
    forged = dict(shares)
    forged[c1] = (shares[c1] + 12345) % P
    forged[c2] = (shares[c2] + _interpolate(g, c2 + 1)) % P
    return forged


def test_a_reconstruction_shifted_in_a_clamped_bit_is_refused_and_no_honest_holder_named():
    private, advert, shares = _honest_round()
    shift = 1 << 248  # the lowest bit of byte 0 of the key, which X25519 clears
    assert not private[0] & 1
    flipped = bytes([private[0] | 1]) + private[1:]
    assert x25519_public(flipped) == advert.mask_public  # the value many secrets share
    rebuilt, culprits = rebuild_mask_key(OWNER, _forge(shares, shift), threshold=T, advert=advert)
    assert rebuilt == private  # the exact bytes, not an equivalent key
    assert not culprits & set(HONEST)


def test_an_ambiguous_decoding_names_nobody():
    """With the exact secret, the colluders can still fit t shares to a second polynomial
    (g(0) = 0); with only t + 2 holders' worth of redundancy nothing tells the two apart, so
    nobody is named (the secret itself is right)."""
    private, advert, shares = _honest_round()
    rebuilt, culprits = rebuild_mask_key(OWNER, _forge(shares, 0), threshold=T, advert=advert)
    assert rebuilt == private
    assert not culprits & set(HONEST)


def test_one_wrong_share_is_still_named():
    private, advert, shares = _honest_round()
    wrong = dict(shares)
    wrong[COLLUDERS[0]] = (wrong[COLLUDERS[0]] + 1) % P
    rebuilt, culprits = rebuild_mask_key(OWNER, wrong, threshold=T, advert=advert)
    assert rebuilt == private and culprits == {COLLUDERS[0]}
