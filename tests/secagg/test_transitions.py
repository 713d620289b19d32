"""Every (state, message) pair of both machines is either legal or refused with the typed error."""

from __future__ import annotations

import pytest

from fedcore.errors import LocalProtocolError, RemoteProtocolError
from fedcore.secagg import ClientState, Mode, ServerState
from fedcore.secagg.messages import (
    CLIENT_MESSAGES,
    SERVER_MESSAGES,
    ClientMessage,
    MaskedInputRequest,
    ServerMessage,
)
from fedcore.secagg.state import CLIENT_SPARSE_ONLY as _SPARSE_ONLY
from fedcore.secagg.state import CLIENT_TRANSITIONS as CLIENT_TABLE
from fedcore.secagg.state import SERVER_TRANSITIONS as SERVER_TABLE
from fedcore.secagg.state import Command

from .helpers import World, make_world

MODES = [Mode.SEMI_HONEST, Mode.ACTIVE]
GRAPHS = [0, 2]  # complete; sparse (k = 2 among 4: the reveal stage runs)


def _stages(mode: Mode, neighbors: int = 0) -> int:
    return (5 if mode is Mode.ACTIVE else 4) + (1 if neighbors else 0)


def _world(mode: Mode, neighbors: int) -> World:
    w = make_world(4, mode=mode, seed=11, neighbors=neighbors)
    w.auto_reveal = False
    return w


def _recorded(
    mode: Mode, neighbors: int = 0
) -> tuple[list[ServerMessage], dict[type, ClientMessage]]:
    """Client 0's server messages and one genuine client message of each type, from one run."""
    w = _world(mode, neighbors)
    answers: dict[type, ClientMessage] = {}
    stages = _stages(mode, neighbors)
    for i in range(stages):
        for cid in sorted(w.requests):
            out = w.answer(cid)
            if cid == 0:
                answers[type(out)] = out
            w.server.receive(cid, out)
        if i < stages - 1:
            w.requests = w.server.advance()
        else:
            w.server.finish()
    return w.history[0], answers


def _client_at(mode: Mode, consumed: list[ServerMessage], neighbors: int) -> World:
    w = _world(mode, neighbors)
    client = w.clients[0]
    for m in consumed:
        vector = w.inputs[0] if isinstance(m, MaskedInputRequest) else None
        client.receive(m, vector=vector)
    return w


def _sample_for(kind: type, history: list[ServerMessage]) -> ServerMessage:
    for m in history:
        if isinstance(m, kind):
            return m
    # ConsistencyRequest does not occur in SEMI_HONEST runs, nor RevealRequest with the complete
    # graph: borrow one from a sparse ACTIVE run.
    for m in _recorded(Mode.ACTIVE, 2)[0]:
        if isinstance(m, kind):
            return m
    raise AssertionError(kind)


@pytest.mark.parametrize("neighbors", GRAPHS)
@pytest.mark.parametrize("mode", MODES)
def test_every_client_state_and_message_pair(mode: Mode, neighbors: int) -> None:
    history, _ = _recorded(mode, neighbors)
    checked = 0
    for consumed in range(len(history) + 2):  # +1: DONE, +2: ABORTED
        for kind in SERVER_MESSAGES:
            w = _client_at(mode, history[: min(consumed, len(history))], neighbors)
            client = w.clients[0]
            if consumed == len(history) + 1:
                client.abort()
            state = client.state
            row = CLIENT_TABLE.get((state, kind))
            legal = row is not None and row[0 if mode is Mode.SEMI_HONEST else 1] is not None
            if _SPARSE_ONLY.get((state, kind)) is (not neighbors):
                legal = False  # a row for the other kind of graph
            message = (
                history[consumed]
                if consumed < len(history) and isinstance(history[consumed], kind)
                else _sample_for(kind, history)
            )
            vector = w.inputs[0] if isinstance(message, MaskedInputRequest) else None
            if legal:
                client.receive(message, vector=vector)
                assert client.state is row[0 if mode is Mode.SEMI_HONEST else 1]  # type: ignore[index]
            else:
                with pytest.raises(LocalProtocolError):
                    client.receive(message, vector=vector)
                assert client.state is ClientState.ABORTED
            checked += 1
    assert checked == (len(history) + 2) * len(SERVER_MESSAGES)


def _server_at(mode: Mode, stage_index: int, neighbors: int = 0) -> World:
    """stage_index: 0 idle, 1 advertise, 2 share (or reveal), ... ; -1 done; -2 aborted."""
    w = _world(mode, neighbors)  # make_world starts the server: it is in ADVERTISE
    if stage_index == 0:
        from fedcore.secagg import SecAggServer

        w.server = SecAggServer(w.config, registry=w.registry)
        return w
    if stage_index == -2:
        w.server.abort()
        return w
    stages = _stages(mode, neighbors)
    steps = stages if stage_index == -1 else stage_index - 1
    for i in range(steps):
        if i == stages - 1:
            w.finish()
        else:
            w.step()
    return w


@pytest.mark.parametrize("neighbors", GRAPHS)
@pytest.mark.parametrize("mode", MODES)
def test_every_server_state_and_message_pair(mode: Mode, neighbors: int) -> None:
    _, samples = _recorded(mode, neighbors)
    # ConsistencySignature for SEMI_HONEST, RingReveal for the complete graph
    samples = {**_recorded(Mode.ACTIVE, 2)[1], **samples}
    stages = _stages(mode, neighbors)
    seen_states = set()
    for index in [0, *range(1, stages + 1), -1, -2]:
        for kind in CLIENT_MESSAGES:
            w = _server_at(mode, index, neighbors)
            server = w.server
            state = server.state
            seen_states.add(state)
            row = SERVER_TABLE.get((state, kind))
            legal = row is not None and row[0 if mode is Mode.SEMI_HONEST else 1] is not None
            if kind in samples and legal:
                # a genuine message of this stage, answered by client 0 of this very world
                message = w.answer(0)
                assert isinstance(message, kind)
                server.receive(0, message)
                assert server.state is state
                assert 0 not in server.pending
            elif state in (ServerState.IDLE, ServerState.DONE, ServerState.ABORTED):
                with pytest.raises(LocalProtocolError):
                    server.receive(0, samples[kind])
                assert server.state is ServerState.ABORTED
            else:
                # a peer's message for another stage: that peer's slot closes, the round goes on
                with pytest.raises(RemoteProtocolError):
                    server.receive(0, samples[kind])
                assert server.state is state
                assert 0 in server.failed and 0 not in server.pending
    expected = {
        ServerState.IDLE,
        ServerState.ADVERTISE,
        ServerState.SHARE,
        ServerState.MASKED_INPUT,
        ServerState.UNMASK,
        ServerState.DONE,
        ServerState.ABORTED,
    }
    if mode is Mode.ACTIVE:
        expected.add(ServerState.CONSISTENCY)
    if neighbors:
        expected.add(ServerState.REVEAL)
    assert seen_states == expected


@pytest.mark.parametrize("neighbors", GRAPHS)
@pytest.mark.parametrize("mode", MODES)
def test_every_server_state_and_command_pair(mode: Mode, neighbors: int) -> None:
    stages = _stages(mode, neighbors)
    for index in [0, *range(1, stages + 1), -1, -2]:
        for command in Command:
            w = _server_at(mode, index, neighbors)
            server = w.server
            state = server.state
            row = SERVER_TABLE.get((state, command))
            legal = row is not None and row[0 if mode is Mode.SEMI_HONEST else 1] is not None
            call = {
                Command.START: lambda s=server: s.start(),
                Command.ADVANCE: lambda s=server, w=w: _answer_all_then(w, s.advance),
                Command.FINISH: lambda s=server, w=w: _answer_all_then(w, s.finish),
            }[command]
            if legal:
                call()
                target = row[0 if mode is Mode.SEMI_HONEST else 1]  # type: ignore[index]
                if neighbors and state is ServerState.ADVERTISE and command is Command.ADVANCE:
                    target = ServerState.REVEAL  # a sparse graph's ring waits for the reveals
                assert server.state is target
            else:
                with pytest.raises(LocalProtocolError):
                    call()
                assert server.state is ServerState.ABORTED


def _answer_all_then(w: World, command) -> object:  # type: ignore[no-untyped-def]
    if w.server.state not in (ServerState.IDLE, ServerState.DONE, ServerState.ABORTED):
        for cid in sorted(w.requests):
            w.server.receive(cid, w.answer(cid))
    return command()


def test_each_stage_is_exactly_one_collecting_server_state() -> None:
    """ServerState carries Stage members, not copies of their strings: nothing to drift."""
    from fedcore.secagg import Stage

    collecting = [s for s in ServerState if s.stage is not None]
    assert [s.stage for s in collecting] == list(Stage)
    assert all(ServerState(s.stage) is s for s in collecting)
