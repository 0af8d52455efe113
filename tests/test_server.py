"""
Tests for L{txtask._server.TaskServer} on a memory reactor that records
C{spawnProcess} and lets each test decide when a "process" exits.

Accepted connections are real socketpairs, since the server hands their
descriptors to workers and watches them for hang-ups; nothing is spawned.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from fakes import (
    FakeListeningPort,
    FakeProcess,
    FakeProcessReactor,
    FakeSocketTransport,
    make_module,
    outcomes,
)
from twisted.application.service import IService
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError, ConnectionDone, ProcessDone
from twisted.internet.interfaces import (
    IListeningPort,
    IProcessTransport,
    IReactorProcess,
    ITransport,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from txtask._server import TaskServer, import_path
from txtask.worker import (
    CONNECTION_FD,
    ENTRY,
    STATUS_COUNTER,
    STATUS_FD,
    decode_settings,
)


class Harness:
    """
    A server on a fake reactor, and the client sockets connected to it.
    """

    def __init__(self) -> None:
        self.reactor = FakeProcessReactor()
        self.sockets: list[socket.socket] = []

    def start(self, interface: Any = "myapp.hasher", **options: Any) -> TaskServer:
        server = TaskServer(interface, reactor=self.reactor, **options)
        server.startService()
        return server

    def connect(self) -> tuple[Any, FakeSocketTransport, socket.socket]:
        """
        A client connects: the server accepts a socketpair's end.
        """
        client_end, server_end = socket.socketpair()
        self.sockets += [client_end, server_end]
        _, factory, *_ = (self.reactor.unixServers or self.reactor.tcpServers)[-1]
        protocol = factory.buildProtocol(None)
        transport = FakeSocketTransport(server_end.fileno())
        protocol.makeConnection(transport)
        return protocol, transport, client_end

    @property
    def processes(self) -> list[FakeProcess]:
        return self.reactor.processes

    def close(self) -> None:
        for process in self.reactor.processes:
            process.close_inherited()
        for opened in self.sockets:
            opened.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness()
    yield made
    made.close()


@pytest.fixture
def killed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """
    Process groups the server kills; no signal is really sent.
    """
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pid, sig: calls.append((pid, sig)))
    return calls


def server_events(events: list[Any], level: LogLevel) -> list[Any]:
    return [
        event
        for event in events
        if event.get("log_level") == level
        and event.get("log_namespace") == "txtask._server.TaskServer"
    ]


def set_status(process: FakeProcess, counter: int) -> None:
    """
    Write the worker's call counter, as the worker does (odd: in a call).
    """
    with mmap.mmap(process.inherited[STATUS_FD], STATUS_COUNTER.size) as page:
        STATUS_COUNTER.pack_into(page, 0, counter)


# The fakes


def test_fake_process_reactor_provides_ireactorprocess() -> None:
    assert verifyObject(IReactorProcess, FakeProcessReactor())


def test_fake_process_provides_iprocesstransport() -> None:
    process = FakeProcess(ProcessProtocol(), "python", [], None, None)
    assert verifyObject(IProcessTransport, process)


def test_fake_listening_port_provides_ilisteningport() -> None:
    port = FakeListeningPort("txtask.sock")
    assert verifyObject(IListeningPort, port)
    assert outcomes(port.stopListening()) == [None]
    assert not port.listening


def test_fake_socket_transport_provides_itransport() -> None:
    transport = FakeSocketTransport(7)
    assert verifyObject(ITransport, transport)
    transport.stopReading()
    assert (transport.fileno(), transport.reading) == (7, False)


def test_fake_process_end_tells_the_protocol() -> None:
    ended: list[Failure] = []
    protocol = ProcessProtocol()
    protocol.processEnded = ended.append  # type: ignore[method-assign]
    FakeProcessReactor().spawnProcess(protocol, "python", ["python"]).end()
    assert isinstance(ended[0].value, ProcessDone)


# import_path


def module_function() -> None:
    pass


class ModuleClass:
    pass


def test_import_path_keeps_a_string() -> None:
    assert import_path("myapp.hasher:Hasher", "interface") == "myapp.hasher:Hasher"


def test_import_path_of_a_module_is_its_name() -> None:
    assert import_path(json, "interface") == "json"


def test_import_path_of_a_function_names_module_and_function() -> None:
    assert import_path(module_function, "setup") == f"{__name__}:module_function"


def test_import_path_of_a_class_names_module_and_class() -> None:
    assert import_path(ModuleClass, "interface") == f"{__name__}:ModuleClass"


def test_import_path_of_a_nested_class_uses_its_qualified_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = make_module(
        monkeypatch, "txtask_test_nest", "class Outer:\n    class Inner:\n        pass"
    )
    assert import_path(module.Outer.Inner, "interface") == (
        "txtask_test_nest:Outer.Inner"
    )


@pytest.mark.parametrize("path", ["", ":attribute"])
def test_import_path_refuses_a_string_without_module(path: str) -> None:
    with pytest.raises(ValueError, match="setup"):
        import_path(path, "setup")


def test_import_path_refuses_a_lambda() -> None:
    with pytest.raises(TypeError, match="interface"):
        import_path(lambda: None, "interface")


def test_import_path_refuses_a_nested_function() -> None:
    def nested() -> None:
        pass

    with pytest.raises(TypeError, match="checkout_done"):
        import_path(nested, "checkout_done")


@pytest.mark.parametrize("target", [len, 42, object(), types.SimpleNamespace()])
def test_import_path_refuses_other_objects(target: Any) -> None:
    with pytest.raises(TypeError):
        import_path(target, "interface")


# Construction


def test_server_is_a_service() -> None:
    assert verifyObject(IService, TaskServer("myapp", reactor=MemoryReactorClock()))


def test_server_constructor_neither_listens_nor_spawns(harness: Harness) -> None:
    TaskServer("myapp.hasher", reactor=harness.reactor)
    assert harness.reactor.unixServers == []
    assert harness.reactor.getDelayedCalls() == []


def test_server_turns_objects_into_import_paths() -> None:
    server = TaskServer(
        json, setup=module_function, checkout_done=module_function, reactor=None
    )
    assert server.interface == "json"
    assert server.setup == server.checkout_done == f"{__name__}:module_function"


@pytest.mark.parametrize(
    "options",
    [
        {"max_workers": 0},
        {"max_workers": "4"},
        {"hung_worker_timeout": 0},
        {"hung_worker_timeout": -1},
        {"shutdown_grace": -1},
    ],
    ids=repr,
)
def test_server_refuses_bad_settings(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TaskServer("myapp", reactor=MemoryReactorClock(), **options)


# Listening


def test_server_listens_on_a_unix_socket_for_its_owner_only(harness: Harness) -> None:
    harness.start()
    [(address, _, _, mode, _)] = harness.reactor.unixServers
    assert address == "txtask.sock"
    assert mode == 0o600


def test_server_keeps_an_explicit_unix_socket_mode(harness: Harness) -> None:
    harness.start(listen="unix:/tmp/txtask-unit.sock:mode=660")
    [(address, _, _, mode, _)] = harness.reactor.unixServers
    assert (address, mode) == ("/tmp/txtask-unit.sock", 0o660)


def test_server_binds_a_unix_socket_under_a_strict_umask(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket is never, even briefly, open to other users."""
    umasks: list[int] = []
    listen = harness.reactor.listenUNIX

    def listen_unix(*args: Any, **kwargs: Any) -> Any:
        current = os.umask(0o022)
        os.umask(current)
        umasks.append(current)
        return listen(*args, **kwargs)

    monkeypatch.setattr(harness.reactor, "listenUNIX", listen_unix)
    before = os.umask(0o022)
    os.umask(before)
    harness.start()
    after = os.umask(0o022)
    os.umask(after)
    assert umasks == [0o177]
    assert after == before


def test_server_listens_on_tcp(harness: Harness) -> None:
    harness.start(listen="tcp:7000:interface=127.0.0.1")
    [(port, _, _, interface)] = harness.reactor.tcpServers
    assert (port, interface) == (7000, "127.0.0.1")


def test_server_listens_on_tcp_loopback_unless_told_otherwise(
    harness: Harness,
) -> None:
    harness.start(listen="tcp:7000")
    harness.start(listen="tcp:7001:interface=0.0.0.0")
    interfaces = [(port, host) for port, _, _, host in harness.reactor.tcpServers]
    assert interfaces == [(7000, "127.0.0.1"), (7001, "0.0.0.0")]


def test_server_listens_on_an_endpoint_object_as_it_is(harness: Harness) -> None:
    endpoint = TCP4ServerEndpoint(harness.reactor, 7002, interface="0.0.0.0")
    harness.start(listen=endpoint)
    [(port, _, _, interface)] = harness.reactor.tcpServers
    assert (port, interface) == (7002, "0.0.0.0")


def test_server_refuses_a_listen_that_is_no_endpoint() -> None:
    with pytest.raises(TypeError, match="7000"):
        TaskServer("myapp", listen=7000, reactor=MemoryReactorClock())


def test_server_listening_fires_with_the_port(harness: Harness) -> None:
    with capturedLogs() as events:
        server = harness.start()
    assert outcomes(server.listening) == [harness.reactor.ports[0]]
    [event] = server_events(events, LogLevel.info)
    assert event["endpoint"] == "unix:txtask.sock"


def test_server_that_cannot_listen_raises_and_logs(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise CannotListenError(None, "txtask.sock", OSError("address in use"))

    monkeypatch.setattr(harness.reactor, "listenUNIX", refuse)
    server = TaskServer("myapp", reactor=harness.reactor)
    listening = outcomes(server.listening)
    with capturedLogs() as events:
        with pytest.raises(CannotListenError):
            server.startService()
    assert not server.running
    [event] = server_events(events, LogLevel.error)
    assert event["endpoint"] == "unix:txtask.sock"
    assert isinstance(listening[0].value, CannotListenError)


def test_server_sets_its_process_title_from_name(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    setproctitle = pytest.importorskip("setproctitle")
    titles: list[str] = []
    monkeypatch.setattr(setproctitle, "setproctitle", titles.append)
    harness.start(name="passwd-hasher")
    assert titles == ["txtask-server: passwd-hasher"]


# Spawning workers


def test_server_spawns_a_worker_for_each_connection(harness: Harness) -> None:
    harness.start(
        interface="myapp.hasher",
        setup="myapp.hasher:setup",
        checkout_done="myapp.db:rollback",
        name="hasher",
        log_level="DEBUG",
        max_frame_size=1024,
        worker_memory_limit=2**28,
    )
    harness.connect()
    [process] = harness.processes
    assert process.executable == sys.executable
    assert process.args[:3] == [sys.executable, "-c", ENTRY]
    assert decode_settings(process.args[3]) == {
        "interface": "myapp.hasher",
        "setup": "myapp.hasher:setup",
        "checkout_done": "myapp.db:rollback",
        "name": "hasher",
        "number": 1,
        "log_level": "DEBUG",
        "max_frame_size": 1024,
        "memory_limit": 2**28,
    }


def test_server_hands_the_connection_to_the_worker(harness: Harness) -> None:
    harness.start()
    _, transport, _ = harness.connect()
    [process] = harness.processes
    assert process.child_fds is not None
    assert {fd: process.child_fds[fd] for fd in (0, 1, 2, CONNECTION_FD)} == {
        0: "w",
        1: "r",
        2: "r",
        CONNECTION_FD: transport.fileno(),
    }
    assert isinstance(process.child_fds[STATUS_FD], int)
    assert not transport.reading


def test_server_numbers_its_workers(harness: Harness) -> None:
    harness.start()
    harness.connect()
    harness.connect()
    numbers = [decode_settings(p.args[3])["number"] for p in harness.processes]
    assert numbers == [1, 2]


def test_server_logs_worker_start_and_exit(harness: Harness) -> None:
    harness.start()
    with capturedLogs() as events:
        harness.connect()
        [process] = harness.processes
        pid = process.pid
        process.end(3)
    started, exited = server_events(events, LogLevel.info)
    assert (started["worker_id"], started["pid"]) == (1, pid)
    assert (exited["worker_id"], exited["pid"], exited["status"]) == (1, pid, 3)


def test_server_closes_its_copy_of_the_connection_when_the_worker_exits(
    harness: Harness,
) -> None:
    """That close is what tells the client its worker died."""
    harness.start()
    _, transport, _ = harness.connect()
    assert not transport.disconnecting
    harness.processes[0].end()
    assert transport.disconnecting


def test_server_holds_connections_beyond_max_workers(harness: Harness) -> None:
    server = harness.start(max_workers=1)
    harness.connect()
    _, waiting, _ = harness.connect()
    assert len(harness.processes) == 1
    assert server.live_workers == 1
    harness.processes[0].end()
    assert len(harness.processes) == 2
    assert harness.processes[1].child_fds[CONNECTION_FD] == waiting.fileno()
    assert server.live_workers == 1


def test_server_forgets_a_waiting_connection_that_closed(harness: Harness) -> None:
    harness.start(max_workers=1)
    harness.connect()
    waiting, _, _ = harness.connect()
    waiting.connectionLost(Failure(ConnectionDone()))
    harness.processes[0].end()
    assert len(harness.processes) == 1


def test_server_closes_a_connection_that_talks_before_its_worker(
    harness: Harness,
) -> None:
    harness.start(max_workers=1)
    harness.connect()
    waiting, transport, _ = harness.connect()
    with capturedLogs() as events:
        waiting.dataReceived(b"hello?")
    assert transport.disconnected
    [event] = server_events(events, LogLevel.warn)
    assert event["size"] == 6


def test_server_survives_a_failed_spawn(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("too many processes")

    server = harness.start()
    monkeypatch.setattr(harness.reactor, "spawnProcess", fail)
    with capturedLogs() as events:
        _, transport, _ = harness.connect()
    assert transport.disconnected
    assert server.live_workers == 0
    assert len(server_events(events, LogLevel.error)) == 1


def test_server_logs_worker_output_line_by_line(harness: Harness) -> None:
    harness.start()
    harness.connect()
    [process] = harness.processes
    with capturedLogs() as events:
        process.protocol.childDataReceived(2, b"first line\nsecond")
        process.protocol.childDataReceived(2, b" line\r\nthird")
        process.protocol.childDataReceived(1, b"printed\n")
        process.protocol.childConnectionLost(2)
    lines = [(e["stream"], e["line"]) for e in server_events(events, LogLevel.info)]
    assert lines == [
        ("stderr", "first line"),
        ("stderr", "second line"),
        ("stdout", "printed"),
        ("stderr", "third"),
    ]
    assert {e["worker_id"] for e in server_events(events, LogLevel.info)} == {1}


# Hung and abandoned workers


def test_server_kills_a_worker_hung_in_one_call(
    harness: Harness, killed: list[tuple[int, int]]
) -> None:
    harness.start(hung_worker_timeout=4)
    harness.connect()
    [process] = harness.processes
    set_status(process, 1)
    with capturedLogs() as events:
        harness.reactor.pump([1] * 3)
        assert killed == []
        harness.reactor.pump([1] * 2)
    assert killed == [(process.pid, signal.SIGKILL)]
    [event] = server_events(events, LogLevel.warn)
    assert event["worker_id"] == 1
    assert event["elapsed"] >= 4


def test_server_leaves_a_worker_whose_calls_end(
    harness: Harness, killed: list[tuple[int, int]]
) -> None:
    harness.start(hung_worker_timeout=4)
    harness.connect()
    [process] = harness.processes
    for counter in range(1, 9):
        set_status(process, counter)
        harness.reactor.pump([1] * 3)
    assert killed == []


def test_server_without_hung_worker_timeout_never_kills(
    harness: Harness, killed: list[tuple[int, int]]
) -> None:
    harness.start(hung_worker_timeout=None)
    harness.connect()
    set_status(harness.processes[0], 1)
    harness.reactor.pump([1] * 1000)
    assert killed == []


@pytest.mark.parametrize(("counter", "during"), [(1, "setup"), (3, "a call")])
def test_server_kills_a_busy_worker_whose_client_left(
    harness: Harness, killed: list[tuple[int, int]], counter: int, during: str
) -> None:
    harness.start()
    _, _, client_end = harness.connect()
    [process] = harness.processes
    set_status(process, counter)
    client_end.close()
    with capturedLogs() as events:
        for reader in harness.reactor.getReaders():
            reader.doRead()
    assert killed == [(process.pid, signal.SIGKILL)]
    [event] = [e for e in events if "left during" in e["log_format"]]
    assert event["during"] == during


def test_server_lets_an_idle_worker_whose_client_left_exit_alone(
    harness: Harness, killed: list[tuple[int, int]]
) -> None:
    harness.start()
    _, _, client_end = harness.connect()
    client_end.close()
    for reader in harness.reactor.getReaders():
        reader.doRead()
    harness.reactor.pump([1] * 5)
    assert killed == []


# Graceful stop


def test_server_stop_stops_listening(harness: Harness) -> None:
    server = harness.start()
    server.stopService()
    assert not harness.reactor.ports[0].listening
    assert not server.running


def test_server_stop_closes_every_worker_stdin(harness: Harness) -> None:
    server = harness.start()
    harness.connect()
    harness.connect()
    server.stopService()
    assert [p.stdin_closed for p in harness.processes] == [True, True]


def test_server_stop_fires_once_every_worker_exited(harness: Harness) -> None:
    server = harness.start()
    harness.connect()
    harness.connect()
    stopped = outcomes(server.stopService())
    harness.processes[0].end()
    assert stopped == []
    harness.processes[1].end()
    assert stopped == [None]


def test_server_stop_without_workers_fires_at_once(harness: Harness) -> None:
    server = harness.start()
    assert outcomes(server.stopService()) == [None]
    assert harness.reactor.getDelayedCalls() == []


def test_server_stop_drops_connections_still_waiting(harness: Harness) -> None:
    server = harness.start(max_workers=1)
    harness.connect()
    _, waiting, _ = harness.connect()
    server.stopService()
    assert waiting.disconnected
    harness.processes[0].end()
    assert len(harness.processes) == 1


def test_server_stop_refuses_new_connections(harness: Harness) -> None:
    server = harness.start()
    server.stopService()
    _, transport, _ = harness.connect()
    assert transport.disconnected
    assert harness.processes == []


def test_server_stop_kills_workers_left_after_the_grace(
    harness: Harness, killed: list[tuple[int, int]]
) -> None:
    server = harness.start(shutdown_grace=30, hung_worker_timeout=None)
    harness.connect()
    harness.connect()
    stopped = outcomes(server.stopService())
    harness.processes[0].end()
    harness.reactor.advance(29.9)
    assert killed == []
    harness.reactor.advance(0.1)
    assert killed == [(harness.processes[1].pid, signal.SIGKILL)]
    harness.processes[1].end(signal=signal.SIGKILL)
    assert stopped == [None]


def test_server_kill_falls_back_to_the_process_before_its_session_exists(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_group(pid: int, sig: int) -> None:
        raise ProcessLookupError(pid)

    monkeypatch.setattr(os, "killpg", no_group)
    server = harness.start(shutdown_grace=1)
    harness.connect()
    server.stopService()
    harness.reactor.advance(1)
    assert harness.processes[0].signals == ["KILL"]


def test_server_stop_leaves_no_delayed_calls(
    harness: Harness, killed: list[tuple[int, int]]
) -> None:
    server = harness.start()
    harness.connect()
    server.stopService()
    harness.processes[0].end()
    assert harness.reactor.getDelayedCalls() == []
    assert harness.reactor.getReaders() == []


def test_server_stop_accepts_a_port_that_stops_at_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IListeningPort.stopListening may return None instead of a Deferred."""
    server = harness.start()
    monkeypatch.setattr(harness.reactor.ports[0], "stopListening", lambda: None)
    assert outcomes(server.stopService()) == [None]


def test_server_logs_the_graceful_stop(harness: Harness) -> None:
    server = harness.start()
    harness.connect()
    with capturedLogs() as events:
        server.stopService()
        harness.processes[0].end()
    [stopping] = [e for e in server_events(events, LogLevel.info) if "count" in e]
    assert stopping["count"] == 1
    assert stopping["endpoint"] == "unix:txtask.sock"
