"""The session binds every parameter that changes what a site sends, and the safe rules behind the
sites' floors and the server's settings check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedcore.cli import main
from fedcore.config import resolve
from fedcore.crypto import CryptoRng
from fedcore.errors import ConfigError, InvalidMessage, LocalProtocolError
from fedcore.protections import protections_of
from fedcore.secagg import EncodingConfig, SessionConfig, SessionEncoding, encode, encode_update
from fedcore.secagg.config import Mode
from fedcore.secagg.floors import safe_threshold
from fedcore.secagg.messages import AdvertiseRequest, decode_server_message
from fedcore.secagg.session import session_id

BASE = SessionConfig(
    round_id=b"r" * 16,
    clients=(1, 2, 3, 4),
    threshold=3,
    length=8,
    encoding=SessionEncoding(clip=4.0, max_total_weight=1 << 20),
)


@pytest.mark.parametrize(
    "change",
    [
        {"clip": 1e-9},
        {"max_total_weight": 1},
        {"dp_clip_norm": 1.0},
        {"dp_clip_norm": 1.0, "count_unclipped": True},
    ],
)
def test_every_encoding_parameter_changes_the_session_id(change):
    assert BASE.encoding is not None
    other = dataclasses.replace(BASE, encoding=dataclasses.replace(BASE.encoding, **change))
    assert session_id(other, []) != session_id(BASE, [])
    # and it travels inside the advertise request, which the site keeps in its transcript
    assert decode_server_message(encode(AdvertiseRequest(1, other))).config == other


def test_a_session_without_encoding_keeps_its_old_wire_bytes():
    raw = dataclasses.replace(BASE, encoding=None)
    data = encode(AdvertiseRequest(1, raw))
    assert decode_server_message(data).config == raw
    assert len(encode(AdvertiseRequest(1, BASE))) == len(data) + 8 + 8 + 8 + 1


@pytest.mark.parametrize(
    "encoding",
    [
        SessionEncoding(clip=float("nan"), max_total_weight=10),
        SessionEncoding(clip=1.0, max_total_weight=1 << 40),
        SessionEncoding(clip=1.0, max_total_weight=10, dp_clip_norm=-1.0),
        SessionEncoding(clip=1.0, max_total_weight=10, count_unclipped=True),
    ],
)
def test_an_invalid_encoding_is_refused_on_the_wire(encoding):
    with pytest.raises(ConfigError):
        dataclasses.replace(BASE, encoding=encoding)
    good = encode(AdvertiseRequest(1, BASE))
    assert BASE.encoding is not None
    nan = bytearray(good)
    nan[-25:-17] = np.float64("nan").tobytes()  # the clip field, little-endian
    with pytest.raises(InvalidMessage, match="invalid session config"):
        decode_server_message(bytes(nan))


def test_the_encoder_error_does_not_carry_the_weight():
    config = EncodingConfig(bits=32, clip=1.0, max_total_weight=100)
    with pytest.raises(LocalProtocolError) as caught:
        encode_update(np.zeros(3), weight=4321, config=config, rng=CryptoRng.from_seed(0))
    assert "4321" not in str(caught.value)


def test_safe_thresholds_follow_bonawitz_and_the_finder():
    assert safe_threshold(10, neighbors=0, mode=Mode.SEMI_HONEST) == 6  # t > n/2
    assert safe_threshold(10, neighbors=0, mode=Mode.ACTIVE) == 7  # t > 2n/3
    assert safe_threshold(100, neighbors=16, mode=Mode.SEMI_HONEST) == 6  # FCP: k=16 over 100
    with pytest.raises(ConfigError, match="degree 8 over 100"):
        safe_threshold(100, neighbors=8, mode=Mode.SEMI_HONEST)


def test_the_server_refuses_unsafe_settings_before_a_run_unless_opted_in(capsys):
    with pytest.raises(ConfigError, match="'secagg.threshold' is 2, below the safe 6"):
        protections_of(resolve(overrides=["secagg.enabled=true", "secagg.threshold=2"]))
    with pytest.raises(ConfigError, match="'secagg.neighbors' is '2'"):
        protections_of(
            resolve(overrides=["secagg.enabled=true", "secagg.neighbors=2", "sites=100"])
        )
    with pytest.raises(ConfigError, match="below the safe 7"):  # 2n/3 in active mode
        protections_of(
            resolve(overrides=["secagg.enabled=true", "secagg.mode=active", "secagg.threshold=6"])
        )
    assert (
        resolve(
            overrides=["secagg.enabled=true", "secagg.threshold=2", "secagg.allow_unsafe=true"]
        ).secagg.threshold
        == 2
    )
    assert main(["simulate", "--set", "secagg.enabled=true", "--set", "secagg.threshold=2"]) == 2
    assert "below the safe 6" in capsys.readouterr().err
