"""
Tests for L{txtask._protocol.WorkerConnection}, the client's side of one
worker connection, on an in-memory transport.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import pytest
from fakes import (
    FakeTransport,
    FakeWorker,
    failure_of,
    make_module,
    outcomes,
    result_of,
)
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ITransport
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from zope.interface.verify import verifyObject

from txtask import _wire
from txtask._protocol import WorkerConnection
from txtask.errors import ProtocolError
from txtask.worker import Worker


class Listener:
    """
    Records what a worker connection tells its holder.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def reply_received(self, connection: WorkerConnection, message: list) -> None:
        self.events.append(("reply", connection, message))

    def bye_received(self, connection: WorkerConnection) -> None:
        self.events.append(("bye", connection))

    def connection_failed(
        self, connection: WorkerConnection, reason: BaseException
    ) -> None:
        self.events.append(("failed", connection, reason))


def held(clock: Clock, pid: int = 100) -> tuple[FakeWorker, Listener]:
    """
    A connection whose worker said hello, held by a recording listener.
    """
    worker = FakeWorker.connected(clock, pid=pid)
    listener = Listener()
    worker.protocol.listener = listener
    return worker, listener


# The fake transport


def test_fake_transport_provides_itransport() -> None:
    assert verifyObject(ITransport, FakeTransport(Clock()))


def test_fake_transport_delivers_connection_lost_on_the_next_turn() -> None:
    clock = Clock()
    worker = FakeWorker.connected(clock)
    lost = outcomes(worker.protocol.disconnected)
    worker.transport.loseConnection()
    assert lost == []
    clock.advance(0)
    assert lost == [None]


# Hello


def test_worker_connection_ready_fires_on_hello() -> None:
    worker = FakeWorker.connected(Clock(), pid=None)
    ready = outcomes(worker.protocol.ready)
    assert ready == []
    worker.hello(4242)
    assert ready == [worker.protocol]
    assert worker.protocol.pid == 4242


def test_worker_connection_hello_fed_one_byte_at_a_time() -> None:
    worker = FakeWorker.connected(Clock(), pid=None)
    for byte in _wire.hello(4242):
        worker.protocol.dataReceived(bytes([byte]))
    assert result_of(worker.protocol.ready) is worker.protocol


def test_worker_connection_refuses_another_protocol_version() -> None:
    worker = FakeWorker.connected(Clock(), pid=None)
    ready = outcomes(worker.protocol.ready)
    worker.send(["hello", _wire.PROTOCOL_VERSION + 1, 4242])
    assert isinstance(ready[0].value, ProtocolError)
    assert "same txtask version" in str(ready[0].value)
    assert worker.transport.disconnected  # aborted, not closed politely


def test_worker_connection_refuses_a_reply_before_hello() -> None:
    worker = FakeWorker.connected(Clock(), pid=None)
    worker.ok(1)
    assert isinstance(failure_of(worker.protocol.ready), ProtocolError)
    assert worker.closed


def test_worker_connection_ready_fails_when_lost_before_hello() -> None:
    worker = FakeWorker.connected(Clock(), pid=None)
    reason = ConnectionLost("server went away")
    worker.die(reason)
    assert failure_of(worker.protocol.ready) is reason


def test_worker_connection_refuses_a_second_hello() -> None:
    worker, listener = held(Clock())
    worker.hello(5)
    [(event, connection, reason)] = listener.events
    assert (event, connection) == ("failed", worker.protocol)
    assert isinstance(reason, ProtocolError)
    assert worker.closed


# Replies


def test_worker_connection_passes_replies_to_its_listener() -> None:
    worker, listener = held(Clock())
    worker.ok({"hash": b"\x00"})
    worker.error("KeyError", "'user'", traceback="Traceback: here")
    assert listener.events == [
        ("reply", worker.protocol, ["ok", {"hash": b"\x00"}]),
        (
            "reply",
            worker.protocol,
            ["error", "remote", "KeyError", "'user'", "Traceback: here"],
        ),
    ]


def test_worker_connection_passes_several_replies_in_one_chunk() -> None:
    worker, listener = held(Clock())
    worker.protocol.dataReceived(_wire.ok(1) + _wire.ok(2) + _wire.ok(3)[:-1])
    assert [event[2] for event in listener.events] == [["ok", 1], ["ok", 2]]
    worker.protocol.dataReceived(_wire.ok(3)[-1:])
    assert listener.events[-1][2] == ["ok", 3]


def test_worker_connection_refuses_a_reply_in_the_chunk_that_prompted_a_call() -> None:
    """
    A reply in the same chunk as the event that made the client send a call
    was sent before the worker could read that call: it answers nothing.
    """

    class CallsOnReply(Listener):
        def reply_received(self, connection: WorkerConnection, message: list) -> None:
            super().reply_received(connection, message)
            connection.send(_wire.call("next", [], {}))

    worker = FakeWorker.connected(Clock())
    listener = CallsOnReply()
    worker.protocol.listener = listener
    worker.protocol.send(_wire.call("first", [], {}))
    worker.protocol.dataReceived(_wire.ok(1) + _wire.ok(2))
    assert [event[0] for event in listener.events] == ["reply", "failed"]
    assert "before the worker could read the call" in str(listener.events[1][2])
    # The same reply in a chunk of its own is the answer to "next".
    worker = FakeWorker.connected(Clock())
    listener = CallsOnReply()
    worker.protocol.listener = listener
    worker.protocol.send(_wire.call("first", [], {}))
    worker.protocol.dataReceived(_wire.ok(1))
    worker.protocol.dataReceived(_wire.ok(2))
    assert [event[0] for event in listener.events] == ["reply", "reply"]


def test_worker_connection_send_writes_the_frame() -> None:
    worker, _ = held(Clock())
    worker.protocol.send(_wire.call("hash", ["pw"], {}))
    assert worker.received() == [["call", "hash", ["pw"], {}]]


def test_worker_connection_drops_a_reply_nobody_waits_for() -> None:
    """A reply while no listener holds the worker is a protocol error."""
    worker = FakeWorker.connected(Clock())
    with capturedLogs() as events:
        worker.ok(1)
    assert worker.transport.disconnected
    [event] = [e for e in events if e.get("log_namespace", "").startswith("txtask")]
    assert event["log_level"] == LogLevel.warn
    assert event["pid"] == 100
    assert event["endpoint"] == "fake-endpoint"


def test_worker_connection_protocol_error_reaches_the_listener_once() -> None:
    clock = Clock()
    worker, listener = held(clock)
    worker.protocol.dataReceived(b"\x00\x00\x00\x01\xc1")
    worker.die(ConnectionLost("aborted"))
    clock.advance(0)
    [(event, _, reason)] = listener.events
    assert event == "failed"
    assert isinstance(reason, ProtocolError)


def test_worker_connection_stops_at_a_malformed_message() -> None:
    """Messages after the bad one in the same chunk are not delivered."""
    worker, listener = held(Clock())
    worker.protocol.dataReceived(_wire.encode(["launch"]) + _wire.ok(1))
    assert [event[0] for event in listener.events] == ["failed"]


def test_worker_connection_refuses_an_oversized_frame() -> None:
    worker = FakeWorker.connected(Clock(), max_frame_size=64)
    listener = Listener()
    worker.protocol.listener = listener
    worker.ok("x" * 100)
    [(event, _, reason)] = listener.events
    assert event == "failed"
    assert "exceeds the limit of 64" in str(reason)
    assert worker.transport.disconnected


# Bye, loss and close


def test_worker_connection_bye_reaches_the_listener_and_closes() -> None:
    worker, listener = held(Clock())
    worker.bye()
    assert listener.events == [("bye", worker.protocol)]
    assert worker.protocol.listener is None
    assert worker.closed


def test_worker_connection_bye_is_not_also_a_failure() -> None:
    clock = Clock()
    worker, listener = held(clock)
    disconnected = outcomes(worker.protocol.disconnected)
    worker.bye()
    clock.advance(0)
    assert listener.events == [("bye", worker.protocol)]
    assert disconnected == [None]


def test_worker_connection_ignores_messages_after_bye_in_one_chunk() -> None:
    """The worker is leaving: what follows is not a protocol error."""
    worker, listener = held(Clock())
    with capturedLogs() as events:
        worker.protocol.dataReceived(_wire.BYE + _wire.ok(1))
    assert listener.events == [("bye", worker.protocol)]
    assert not worker.transport.disconnected  # closed, not aborted
    assert [e for e in events if e.get("log_level") == LogLevel.warn] == []


def test_worker_connection_loss_reaches_the_listener() -> None:
    worker, listener = held(Clock())
    disconnected = outcomes(worker.protocol.disconnected)
    reason = ConnectionLost("worker exited")
    worker.die(reason)
    assert listener.events == [("failed", worker.protocol, reason)]
    assert disconnected == [None]


def test_worker_connection_close_tells_the_listener_nothing() -> None:
    clock = Clock()
    worker, listener = held(clock)
    disconnected = outcomes(worker.protocol.disconnected)
    worker.protocol.close()
    clock.advance(0)
    assert listener.events == []
    assert worker.protocol.listener is None
    assert disconnected == [None]


def test_worker_connection_close_before_hello_fails_ready() -> None:
    worker = FakeWorker.connected(Clock(), pid=None)
    worker.protocol.close()
    assert isinstance(failure_of(worker.protocol.ready), ConnectionDone)


def test_worker_connection_close_without_transport_is_quiet() -> None:
    """A connection the endpoint never made can be closed: nothing fires."""
    connection = WorkerConnection(1024, "fake-endpoint")
    ready = outcomes(connection.ready)
    connection.close()
    assert ready == []


# Against the real worker loop


def test_worker_connection_talks_to_a_real_worker_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client side reads what Worker writes, over a socketpair."""
    make_module(monkeypatch, "txtask_test_adder", "def add(a, b):\n    return a + b")
    client_end, worker_end = socket.socketpair()
    control_read, control_write = os.pipe()
    worker = Worker(worker_end, control_read, "txtask_test_adder")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        connection = WorkerConnection(_wire.DEFAULT_MAX_FRAME_SIZE, "socketpair")
        transport = FakeTransport(Clock())
        connection.makeConnection(transport)
        listener = Listener()
        connection.listener = listener

        connection.dataReceived(client_end.recv(65536))
        assert connection.pid == os.getpid()
        client_end.sendall(_wire.call("add", [2, 3], {}))
        connection.dataReceived(client_end.recv(65536))
        assert listener.events == [("reply", connection, ["ok", 5])]
    finally:
        client_end.shutdown(socket.SHUT_WR)
        thread.join(timeout=10)
        os.close(control_write)
        os.close(control_read)
        client_end.close()
        worker_end.close()
    assert not thread.is_alive()
