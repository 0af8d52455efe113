"""
Shared fixtures: real servers (in this process or under twistd) with real
worker processes, listening on unix sockets in the test's tmp_path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

import txtask
from txtask import Client, TaskServer

INTERFACES = Path(__file__).parent / "e2e" / "interfaces"
#: Where the imported txtask lives; with an editable install it also holds
#: twisted/plugins, which twistd finds through PYTHONPATH.
SOURCE_ROOT = Path(txtask.__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def worker_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Let workers import the test interfaces.
    """
    paths = [str(INTERFACES), str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))


@pytest.fixture
def until() -> Any:
    """
    Wait, with a bound, for a condition this process can only observe by
    looking (a pool refilling, a process count settling).
    """

    async def wait(condition: Any, timeout: float = 10.0, what: str = "") -> None:
        deadline = reactor.seconds() + timeout
        while not condition():
            if reactor.seconds() > deadline:
                raise AssertionError(f"still waiting after {timeout} s: {what}")
            await deferLater(reactor, 0.01, lambda: None)

    return wait


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "txtask.sock"


@pytest.fixture
def start_server(socket_path: Path) -> Any:
    """
    Start a L{TaskServer} in this process; stopped at the end of the test.
    """
    servers: list[TaskServer] = []

    async def start(interface: str = "sample", **kwargs: Any) -> TaskServer:
        kwargs.setdefault("listen", f"unix:{socket_path}")
        server = TaskServer(interface, **kwargs)
        servers.append(server)
        server.startService()
        await server.listening
        return server

    yield start
    for server in servers:
        if server.running:
            pytest_twisted.blockon(server.stopService())


@pytest.fixture
def make_client(socket_path: Path) -> Any:
    """
    Make L{Client}s; each is closed at the end of the test.
    """
    clients: list[Client] = []

    def make(connect: Any = None, **kwargs: Any) -> Client:
        client = Client(connect or f"unix:{socket_path}", **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        pytest_twisted.blockon(client.close())


class _Events:
    """
    Collect log events of the global publisher during a test.
    """

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._waiters: list[tuple] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        for waiter in list(self._waiters):
            test, fired = waiter
            if test(event):
                self._waiters.remove(waiter)
                fired.callback(event)

    def wait_for(self, test) -> Deferred:
        """
        Fire with the first event, past or future, that passes C{test}.
        """
        for event in self.events:
            if test(event):
                return succeed(event)
        fired: Deferred = Deferred()
        self._waiters.append((test, fired))
        return fired.addTimeout(10, reactor)


@pytest.fixture
def events():
    observer = _Events()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


class _Twistd(ProcessProtocol):
    """
    A twistd process; fires C{listening} when the server logs that it
    listens, C{ended} when it exits.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[Any] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []
        self.listening = self.logged(b"txtask server listening")

    def logged(self, text: bytes) -> Deferred[None]:
        """
        Fire once C{text} appears in the output (at most 30 seconds).
        """
        logged: Deferred[None] = Deferred()
        self._waiting.append((text, logged))
        self.outReceived(b"")
        return logged.addTimeout(30, reactor)

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for waiting in list(self._waiting):
            if waiting[0] in self.output:
                self._waiting.remove(waiting)
                waiting[1].callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(
                RuntimeError(f"twistd exited:\n{self.output.decode()}")
            )
        self.ended.callback(reason.value)


@pytest.fixture
def twistd(socket_path: Path, tmp_path: Path) -> Any:
    """
    Run C{twistd -n txtask ...} in a subprocess; killed at the end.
    """
    processes: list[Any] = []

    async def run(*arguments: str) -> _Twistd:
        protocol = _Twistd()
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "txtask",
            *arguments,
        ]
        if not any(a.startswith("--listen") for a in arguments):
            command += ["--listen", f"unix:{socket_path}"]
        reactor.spawnProcess(
            protocol, sys.executable, command, env=dict(os.environ), path=str(tmp_path)
        )
        processes.append(protocol)
        await protocol.listening
        return protocol

    yield run
    for protocol in processes:
        if not protocol.ended.called:
            protocol.transport.signalProcess("TERM")
            pytest_twisted.blockon(protocol.ended)
