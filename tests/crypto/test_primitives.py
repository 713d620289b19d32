"""X25519, HKDF, AES-GCM, Ed25519 recipes and mask expansion, with published test vectors."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.crypto import CryptoRng, aes_ctr_keystream
from fedcore.crypto.aead import open_sealed, seal
from fedcore.crypto.agreement import agree, derive_key, derive_rng, x25519_keypair, x25519_public
from fedcore.crypto.expand import CHUNK_WORDS, add_keystream, keystream_words
from fedcore.crypto.signing import sign, signing_keypair, verify, verify_key_of
from fedcore.errors import ConfigError, InvalidMessage


def test_x25519_rfc7748_vector() -> None:
    # RFC 7748 section 6.1
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    alice_pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert x25519_public(alice) == alice_pub and x25519_public(bob) == bob_pub
    assert agree(alice, bob_pub) == shared == agree(bob, alice_pub)


def test_keypairs_come_from_the_generator() -> None:
    assert x25519_keypair(CryptoRng.from_seed(1)) == x25519_keypair(CryptoRng.from_seed(1))
    assert x25519_keypair(CryptoRng.from_seed(1)) != x25519_keypair(CryptoRng.from_seed(2))


@pytest.mark.parametrize(
    "point",
    [
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
)
def test_small_order_points_are_refused(point: bytes) -> None:
    with pytest.raises(InvalidMessage):
        agree(bytes(range(32)), point)


def test_agree_checks_lengths() -> None:
    with pytest.raises(InvalidMessage):
        agree(bytes(32), bytes(31))
    with pytest.raises(ConfigError):
        agree(bytes(31), bytes(32))


def test_hkdf_rfc5869_case_1() -> None:
    okm = derive_key(
        bytes.fromhex("0b" * 22),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_derive_rng_recreates_a_generator_per_context() -> None:
    key = bytes(range(32))
    a = derive_rng(key, context=b"secagg|round-1").bytes(64)
    assert a == derive_rng(key, context=b"secagg|round-1").bytes(64)
    assert a != derive_rng(key, context=b"secagg|round-2").bytes(64)
    with pytest.raises(ConfigError):
        derive_rng(b"short", context=b"x")


def test_seal_and_open_bind_the_associated_data() -> None:
    rng = CryptoRng.from_seed(3)
    key = rng.bytes(32)
    sealed = seal(key, b"share", associated_data=b"from 1 to 2", rng=rng)
    assert open_sealed(key, sealed, associated_data=b"from 1 to 2") == b"share"
    with pytest.raises(InvalidMessage):
        open_sealed(key, sealed, associated_data=b"from 1 to 3")
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(InvalidMessage):
        open_sealed(key, bytes(tampered), associated_data=b"from 1 to 2")
    with pytest.raises(InvalidMessage):
        open_sealed(rng.bytes(32), sealed, associated_data=b"from 1 to 2")
    with pytest.raises(InvalidMessage):
        open_sealed(key, sealed[:20], associated_data=b"from 1 to 2")


def test_ed25519_rfc8032_test_1() -> None:
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    signature = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert verify_key_of(seed) == public
    assert sign(seed, b"") == signature
    assert verify(public, signature, b"") is None
    with pytest.raises(InvalidMessage):
        verify(public, signature, b"x")
    with pytest.raises(InvalidMessage):
        verify(public, signature[:63], b"")
    seed2, public2 = signing_keypair(CryptoRng.from_seed(4))
    with pytest.raises(InvalidMessage):
        verify(public2, signature, b"")
    assert verify(public2, sign(seed2, b"m"), b"m") is None


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("n", [1, 5, CHUNK_WORDS, CHUNK_WORDS + 3, 3 * CHUNK_WORDS - 1])
def test_add_keystream_adds_the_aes_ctr_stream(dtype: type, n: int) -> None:
    key = bytes(range(32))
    width = np.dtype(dtype).itemsize
    expected = np.frombuffer(
        aes_ctr_keystream(key, n * width), dtype=np.dtype(dtype).newbyteorder("<")
    )
    np.testing.assert_array_equal(keystream_words(key, n, dtype), expected)
    base = CryptoRng.from_seed(n).integers_below_pow2(n, 8 * width).astype(dtype)
    acc = base.copy()
    add_keystream(acc, key)
    np.testing.assert_array_equal(acc, base + expected.astype(dtype))
    add_keystream(acc, key, subtract=True)
    np.testing.assert_array_equal(acc, base)


def test_add_keystream_validates_its_arguments() -> None:
    with pytest.raises(ConfigError):
        add_keystream(np.zeros(4, dtype=np.uint32), bytes(16))
    with pytest.raises(ConfigError):
        add_keystream(np.zeros(4, dtype=np.int32), bytes(32))
    with pytest.raises(ConfigError):
        add_keystream(np.zeros((2, 2), dtype=np.uint32), bytes(32))
    with pytest.raises(ConfigError):
        add_keystream(np.zeros(8, dtype=np.uint32)[::2], bytes(32))
