"""The states of both SecAgg machines and the one table of legal transitions for each.

Theory of operation. The client (:mod:`fedcore.secagg.client`) and the server
(:mod:`fedcore.secagg.server`) look up every message and every driver command here before they act
on it: a pair that the table does not allow raises :class:`~fedcore.errors.LocalProtocolError`
(the driver fed it at the wrong time) and the machine is left ``ABORTED``. A row gives the next
state in SEMI_HONEST mode and in ACTIVE mode (None where the pair is illegal in that mode); the
ACTIVE-only consistency stage (Bonawitz et al., CCS 2017, section 6) and the sparse-graph reveal
stage (Bell et al., CCS 2020, section 3, :mod:`fedcore.secagg.graph`) are the only rows that
depend on the round.

The server's collecting states are the protocol's stages: each carries its :class:`Stage` as its
value, so the two cannot drift (renaming a stage fails here, at import, and a stage without a
collecting state is refused at import too).
"""

from __future__ import annotations

import enum

from fedcore.errors import LocalProtocolError
from fedcore.secagg.config import Mode, SessionConfig, Stage
from fedcore.secagg.graph import sparse
from fedcore.secagg.messages import (
    AdvertiseRequest,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    RevealRequest,
    RingReveal,
    ServerMessage,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
)


class ClientState(enum.Enum):
    WAIT_ADVERTISE = "wait_advertise"
    WAIT_SHARE = "wait_share"
    WAIT_GRAPH = "wait_graph"  # revealed; waits for every member's reveal (sparse graph only)
    WAIT_MASKED_INPUT = "wait_masked_input"
    WAIT_CONSISTENCY = "wait_consistency"
    WAIT_UNMASK = "wait_unmask"
    DONE = "done"
    ABORTED = "aborted"


class ServerState(enum.Enum):
    """The server's states; a collecting state's value is the :class:`Stage` it collects."""

    IDLE = "idle"
    ADVERTISE = Stage.ADVERTISE
    REVEAL = Stage.REVEAL
    SHARE = Stage.SHARE
    MASKED_INPUT = Stage.MASKED_INPUT
    CONSISTENCY = Stage.CONSISTENCY
    UNMASK = Stage.UNMASK
    DONE = "done"
    ABORTED = "aborted"

    @property
    def stage(self) -> Stage | None:
        """The stage this state collects, or None (idle, done, aborted)."""
        return self.value if isinstance(self.value, Stage) else None

    @property
    def label(self) -> str:
        """The name used in messages: the stage's name, or idle / done / aborted."""
        return self.value.value if isinstance(self.value, Stage) else str(self.value)


if {s.stage for s in ServerState} - {None} != set(Stage):  # pragma: no cover - import-time guard
    raise ImportError("every Stage needs exactly one collecting ServerState")


class Command(enum.Enum):
    """What the driver asks of the server besides handing it a message."""

    START = "start"
    ADVANCE = "advance"
    FINISH = "finish"


_C = ClientState
# (state, message type) -> (next state in SEMI_HONEST mode, next state in ACTIVE mode); None where
# the pair is illegal in that mode. Anything absent is illegal in every mode.
CLIENT_TRANSITIONS: dict[
    tuple[ClientState, type], tuple[ClientState | None, ClientState | None]
] = {
    (_C.WAIT_ADVERTISE, AdvertiseRequest): (_C.WAIT_SHARE, _C.WAIT_SHARE),
    (_C.WAIT_SHARE, ShareKeysRequest): (_C.WAIT_MASKED_INPUT, _C.WAIT_MASKED_INPUT),
    (_C.WAIT_SHARE, RevealRequest): (_C.WAIT_GRAPH, _C.WAIT_GRAPH),
    (_C.WAIT_GRAPH, ShareKeysRequest): (_C.WAIT_MASKED_INPUT, _C.WAIT_MASKED_INPUT),
    (_C.WAIT_MASKED_INPUT, MaskedInputRequest): (_C.WAIT_UNMASK, _C.WAIT_CONSISTENCY),
    (_C.WAIT_CONSISTENCY, ConsistencyRequest): (None, _C.WAIT_UNMASK),
    (_C.WAIT_UNMASK, UnmaskRequest): (_C.DONE, _C.DONE),
}
# Rows legal for one kind of graph only: True for a sparse graph (the ring is drawn by
# commit-reveal, so the share-keys request must follow the reveal), False for the complete one.
CLIENT_SPARSE_ONLY: dict[tuple[ClientState, type], bool] = {
    (_C.WAIT_SHARE, RevealRequest): True,
    (_C.WAIT_GRAPH, ShareKeysRequest): True,
    (_C.WAIT_SHARE, ShareKeysRequest): False,
}

_S = ServerState
# (state, command or message type) -> (next state in SEMI_HONEST mode, in ACTIVE mode); a message
# type maps a collecting state to itself. Anything absent is illegal.
SERVER_TRANSITIONS: dict[
    tuple[ServerState, Command | type], tuple[ServerState | None, ServerState | None]
] = {
    (_S.IDLE, Command.START): (_S.ADVERTISE, _S.ADVERTISE),
    (_S.ADVERTISE, KeyAdvert): (_S.ADVERTISE, _S.ADVERTISE),
    (_S.ADVERTISE, Command.ADVANCE): (_S.SHARE, _S.SHARE),  # _S.REVEAL for a sparse graph
    (_S.REVEAL, RingReveal): (_S.REVEAL, _S.REVEAL),
    (_S.REVEAL, Command.ADVANCE): (_S.SHARE, _S.SHARE),
    (_S.SHARE, EncryptedShares): (_S.SHARE, _S.SHARE),
    (_S.SHARE, Command.ADVANCE): (_S.MASKED_INPUT, _S.MASKED_INPUT),
    (_S.MASKED_INPUT, MaskedInput): (_S.MASKED_INPUT, _S.MASKED_INPUT),
    (_S.MASKED_INPUT, Command.ADVANCE): (_S.UNMASK, _S.CONSISTENCY),
    (_S.CONSISTENCY, ConsistencySignature): (None, _S.CONSISTENCY),
    (_S.CONSISTENCY, Command.ADVANCE): (None, _S.UNMASK),
    (_S.UNMASK, UnmaskShares): (_S.UNMASK, _S.UNMASK),
    (_S.UNMASK, Command.FINISH): (_S.DONE, _S.DONE),
}
COLLECTING = frozenset(s for s in ServerState if s.stage is not None)


def _column(mode: Mode) -> int:
    return 0 if mode is Mode.SEMI_HONEST else 1


def client_next_state(
    state: ClientState, message: ServerMessage, config: SessionConfig | None
) -> ClientState:
    """The client's next state on ``message``; LocalProtocolError where the table forbids it.

    ``config``: the session the client joined (None before the advertise request, whose own
    config then decides the mode)."""
    row = CLIENT_TRANSITIONS.get((state, type(message)))
    if isinstance(message, AdvertiseRequest):
        mode = message.config.mode
    else:
        mode = config.mode if config is not None else Mode.SEMI_HONEST
    target = None if row is None else row[_column(mode)]
    graph_kind = CLIENT_SPARSE_ONLY.get((state, type(message)))
    if graph_kind is not None and config is not None and sparse(config) is not graph_kind:
        target = None
    if target is None:
        graph = (
            "" if config is None else (", sparse graph" if sparse(config) else ", complete graph")
        )
        raise LocalProtocolError(
            f"client in state {state.value} cannot take a {type(message).__name__}"
            f" ({mode.name} mode{graph})"
        )
    return target


def server_row(state: ServerState, event: Command | type, mode: Mode) -> ServerState | None:
    """The table's next state for ``event`` in ``state`` and ``mode`` (None: illegal)."""
    row = SERVER_TRANSITIONS.get((state, event))
    return None if row is None else row[_column(mode)]


def server_target(state: ServerState, event: Command | type, config: SessionConfig) -> ServerState:
    """The server's next state on a command or message type; LocalProtocolError if illegal."""
    target = server_row(state, event, config.mode)
    if state is _S.ADVERTISE and event is Command.ADVANCE and sparse(config):
        target = _S.REVEAL
    if target is None:
        name = event.value if isinstance(event, Command) else event.__name__
        raise LocalProtocolError(f"server in state {state.label} cannot {name}")
    return target
