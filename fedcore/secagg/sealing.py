"""A client's Shamir shares in transit: sealed for each neighbour, opened by their recipient.

Theory of operation (Bonawitz et al., CCS 2017, figure 4, rounds 1 and 2): client u sends each
neighbour v the pair (share of b_u, share of s_u^SK) sealed under a key only u and v can derive,
HKDF(agree(c_u, c_v^PK), session id, u, v) (:func:`fedcore.secagg.session.share_key_from_secret`),
with the session id, u and v as associated data, and u || v inside the plaintext, so a share cannot
be replayed into another session, re-addressed, or passed off as another sender's. The server only
routes the ciphertexts. A share that does not open, or opens to something other than two field
elements for this very pair, is unusable (:class:`~fedcore.errors.InvalidMessage`); the recipient
then treats its sender as dropped for this pair (:func:`opened_shares`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from fedcore.crypto import aead
from fedcore.crypto.agreement import AgreementKey, agree
from fedcore.crypto.stream import CryptoRng
from fedcore.errors import InvalidMessage, RemoteProtocolError
from fedcore.secagg import shamir
from fedcore.secagg.messages import EncryptedShare, KeyAdvert
from fedcore.secagg.session import (
    decode_share_pair,
    encode_share_pair,
    share_associated_data,
    share_key_from_secret,
)


def seal_shares(
    *,
    me: int,
    holders: Sequence[int],
    seed_shares: Mapping[int, int],
    key_shares: Mapping[int, int],
    enc_key: AgreementKey,
    adverts: Mapping[int, KeyAdvert],
    sid: bytes,
    rng: CryptoRng,
) -> tuple[tuple[EncryptedShare, ...], dict[int, bytes]]:
    """Each holder but ``me`` gets its (seed share, key share) sealed for it, in holder order.

    Returns the sealed shares and, by neighbour, the agreed secret agree(c_u, c_v^PK) (kept so that
    the next stage opens the neighbour's share without agreeing again). The AEAD nonces are drawn
    from ``rng`` in holder order."""
    sealed = []
    secrets: dict[int, bytes] = {}
    for v in holders:
        if v == me:
            continue
        secrets[v] = agree(enc_key, adverts[v].enc_public)
        key = share_key_from_secret(secrets[v], sid, me, v)
        plaintext = encode_share_pair(me, v, seed_shares[v], key_shares[v])
        ciphertext = aead.seal(
            key, plaintext, associated_data=share_associated_data(sid, me, v), rng=rng
        )
        sealed.append(EncryptedShare(me, v, ciphertext))
    return tuple(sealed), secrets


def open_share(share: EncryptedShare, *, me: int, shared: bytes, sid: bytes) -> tuple[int, int]:
    """The (seed share, key share) sealed in ``share`` for ``me``, given the agreed secret
    ``shared``; InvalidMessage when it does not open or holds something else (the sender's fault,
    or the carrier's: either way unusable)."""
    key = share_key_from_secret(shared, sid, share.sender, me)
    plaintext = aead.open_sealed(
        key, share.ciphertext, associated_data=share_associated_data(sid, share.sender, me)
    )
    sender, receiver, seed_share, key_share = decode_share_pair(plaintext)
    if (sender, receiver) != (share.sender, me):
        raise InvalidMessage(f"sealed share of client {share.sender} names another pair")
    if seed_share >= shamir.PRIME or key_share >= shamir.PRIME:
        raise InvalidMessage(f"share from client {sender} is not a field element")
    return seed_share, key_share


def opened_shares(
    shares: Iterable[EncryptedShare],
    *,
    me: int,
    neighbors: frozenset[int],
    open_one: Callable[[EncryptedShare], tuple[int, int]],
) -> tuple[dict[int, tuple[int, int]], frozenset[int]]:
    """The shares addressed to ``me``, opened: sender -> (seed share, key share), and the senders
    whose share did not open (InvalidMessage from ``open_one``: they count as dropped for me).

    Raises RemoteProtocolError for a share addressed to someone else, sent by a non-neighbour, or
    a second share from one sender."""
    received: dict[int, tuple[int, int]] = {}
    unopened: set[int] = set()
    for share in shares:
        if share.receiver != me:
            raise RemoteProtocolError(
                f"share from {share.sender} is addressed to {share.receiver}, not to {me}"
            )
        if share.sender not in neighbors:
            raise RemoteProtocolError(f"share from client {share.sender}, not a neighbour")
        if share.sender in received or share.sender in unopened:
            raise RemoteProtocolError(f"two shares from client {share.sender}")
        try:
            received[share.sender] = open_one(share)
        except InvalidMessage:
            unopened.add(share.sender)
    return received, frozenset(unopened)
