"""Secure aggregation: SecAgg (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020) as
sans-IO state machines, with an in-memory harness and a float <-> ring encoding.

Integers in, integers out: the core sums vectors of unsigned integers modulo 2**bits. Modules:

- :mod:`~fedcore.secagg.client`, :mod:`~fedcore.secagg.server`: the two state machines, with
  their one transition table each in :mod:`~fedcore.secagg.state`; the client's stages lean on
  :mod:`~fedcore.secagg.client_keys` (its secrets), :mod:`~fedcore.secagg.sealing`,
  :mod:`~fedcore.secagg.masking`, :mod:`~fedcore.secagg.survivors` and
  :mod:`~fedcore.secagg.rules`, the server's last stage on :mod:`~fedcore.secagg.recovery`;
- :mod:`~fedcore.secagg.floors`: the weakest round a site joins, held at every stage;
- :mod:`~fedcore.secagg.messages`: the ten messages and their wire format;
- :mod:`~fedcore.secagg.config`: round settings, modes, stages, default threshold;
- :mod:`~fedcore.secagg.params`: (k, t) for SecAgg+ after Bell et al. as in Google's FCP;
- :mod:`~fedcore.secagg.encoding`: float updates to the ring and back (weighted means);
- :mod:`~fedcore.secagg.harness`: :func:`aggregate_in_memory`.

Nothing here imports Flower, opens a socket or reads a clock.
"""

from fedcore.secagg.client import ClientState, SecAggClient
from fedcore.secagg.config import Mode, SessionConfig, SessionEncoding, Stage, default_threshold
from fedcore.secagg.encoding import (
    EncodingConfig,
    decode_mean,
    decode_sum,
    encode_update,
    from_ring,
    stochastic_round,
    to_ring,
)
from fedcore.secagg.errors import TooFewSurvivors
from fedcore.secagg.harness import RoundReport, aggregate_in_memory, run_in_memory
from fedcore.secagg.messages import decode, decode_client_message, decode_server_message, encode
from fedcore.secagg.params import AdversaryClass, GraphParameters, harary_parameters
from fedcore.secagg.server import AggregateResult, SecAggServer, ServerState

__all__ = [
    "AdversaryClass",
    "EncodingConfig",
    "GraphParameters",
    "decode_mean",
    "decode_sum",
    "encode_update",
    "from_ring",
    "harary_parameters",
    "stochastic_round",
    "to_ring",
    "AggregateResult",
    "ClientState",
    "Mode",
    "RoundReport",
    "SecAggClient",
    "SecAggServer",
    "ServerState",
    "SessionConfig",
    "SessionEncoding",
    "Stage",
    "TooFewSurvivors",
    "aggregate_in_memory",
    "decode",
    "decode_client_message",
    "decode_server_message",
    "default_threshold",
    "encode",
    "run_in_memory",
]
