"""
Benchmark txtask against a bare Twisted-to-blocking-worker loop.

Run it from a regular, non-editable install of txtask, from the root of a
clone:

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install .
    /tmp/benchvenv/bin/python benchmarks/bench.py

Every worker process imports txtask as it starts. When that import comes
from a source tree (an editable install, or PYTHONPATH pointing at the
checkout) and PYTHONDONTWRITEBYTECODE is set, Python compiles txtask afresh in each worker and the cold checkout figure
measures the compiler. The script prints where it imported txtask from and
warns when that is a source tree.

What it measures, in one run of 7 to 15 seconds:

  - the bare loop, the baseline: a plain Twisted Protocol sends C{>I}-framed
    msgpack calls over a unix socket to C{bare_worker.py}, a blocking loop
    that imports only msgpack and returns the call's argument;
  - txtask: a TaskServer in its own process (C{twistd -n txtask}) and a
    L{txtask.Client} in this one, calling C{echo} in an interface module
    written to a temporary directory.

For both, the sequential call latency on one connection (microseconds per
call) and the aggregate calls per second of 4 connections each making
sequential calls, to 4 workers; each is the best of several rounds, bare
and txtask rounds taking turns. For txtask alone, the cold checkout: the
time from C{client.checkout().echo()} to the reply when no worker is idle,
so that a connection, a worker process, its hello and the call are all
needed; the median of 20. The callers are plain Deferred callbacks on both
sides. Figures are printed with the targets, never asserted.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import msgpack
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IReactorCore
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure

import txtask

#: Calls in one round of the sequential measurement.
SEQUENTIAL_CALLS = 1000
#: Calls on each connection in one round of the concurrent measurement.
CONCURRENT_CALLS = 1000
#: Connections, and workers, in the concurrent measurement.
CONCURRENCY = 4
#: Rounds of each sequential and concurrent measurement; the best is shown.
#: Many short rounds stand a better chance of catching the machine quiet.
ROUNDS = 15
#: Calls on each connection before the rounds start.
WARM_UP_CALLS = 500
#: Cold checkouts timed; the median is shown.
COLD_REPEATS = 20
#: Seconds any one wait may take before the benchmark gives up.
WAIT_LIMIT = 30.0

#: The argument of every call, which the worker returns.
VALUE = "ping"

INTERFACE_MODULE = "txtask_bench_interface"
INTERFACE_SOURCE = '''"""The interface the txtask benchmark calls."""


def echo(value):
    return value
'''

BARE_WORKER = Path(__file__).with_name("bare_worker.py")
TWISTD = "from twisted.scripts.twistd import run; run()"

#: One call to make: returns the Deferred of its reply.
Call = Callable[[], "Deferred[Any]"]

_FRAME = struct.Struct(">I")


class BareConnection(Protocol):
    """
    The baseline's client side: the same frames as txtask, and nothing else.

    Replies come back in order, so each one fires the oldest waiting
    Deferred.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._replies: deque[Deferred[Any]] = deque()

    def echo(self, value: object) -> Deferred[Any]:
        """
        Call C{echo(value)} on the worker.

        @return: A Deferred firing with the value the worker returns, or
            failing with the reason the connection was lost.
        """
        body = msgpack.packb(["call", "echo", [value], {}])
        self.transport.write(_FRAME.pack(len(body)) + body)
        reply: Deferred[Any] = Deferred()
        self._replies.append(reply)
        return reply

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data
        offset = 0
        while len(buffer) - offset >= 4:
            (size,) = _FRAME.unpack_from(buffer, offset)
            end = offset + 4 + size
            if end > len(buffer):
                break
            _verb, value = msgpack.unpackb(buffer[offset + 4 : end])
            offset = end
            self._replies.popleft().callback(value)
        self._buffer = buffer[offset:]

    def connectionLost(self, reason: Failure = None) -> None:
        while self._replies:
            self._replies.popleft().errback(reason)


class BareWorker(ProcessProtocol):
    """
    A C{bare_worker.py} process and this side's connection to it.

    @ivar connection: The connection, over a unix socket pair.
    @ivar ended: Fires with C{None} when the process has exited.
    """

    def __init__(self) -> None:
        self.connection = BareConnection()
        self.ended: Deferred[None] = Deferred()

    @classmethod
    def start(cls, reactor: Any) -> BareWorker:
        """
        Spawn a worker with one end of a socket pair as its descriptor 3,
        as a txtask server does with an accepted connection.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = cls()
        reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, str(BARE_WORKER)],
            env=os.environ,
            childFDs={1: 1, 2: 2, 3: theirs.fileno()},
        )
        theirs.close()

        # The reactor adopts a duplicate of the descriptor.
        ours.setblocking(False)
        reactor.adoptStreamConnection(
            ours.fileno(),
            socket.AF_UNIX,
            Factory.forProtocol(lambda: worker.connection),
        )
        ours.close()
        return worker

    def stop(self) -> None:
        """
        Close the connection, which makes the worker exit.
        """
        self.connection.transport.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class ServerProcess(ProcessProtocol):
    """
    A txtask server run by twistd, followed through the log it prints.

    @ivar listening: Fires with C{None} once the server listens; fails if
        the process exits first.
    @ivar ended: Fires with C{None} when the process has exited.
    @ivar output: Every line the process printed, shown if the run fails.
    """

    def __init__(self) -> None:
        self.listening: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.output: list[str] = []
        self._partial = {1: b"", 2: b""}
        self._exits = 0
        self._exit_waiters: list[tuple[int, Deferred[None]]] = []

    @classmethod
    def start(cls, reactor: Any, directory: Path) -> tuple[ServerProcess, str]:
        """
        Write the interface module into C{directory} and serve it there.

        @return: The server, and the client endpoint description to reach it.
        """
        (directory / f"{INTERFACE_MODULE}.py").write_text(INTERFACE_SOURCE)
        socket_path = directory / "txtask.sock"
        python_path = [str(directory), os.environ.get("PYTHONPATH", "")]
        server = cls()
        reactor.spawnProcess(
            server,
            sys.executable,
            [sys.executable, "-c", TWISTD, "-n", "txtask"]
            + ["--interface", INTERFACE_MODULE, "--listen", f"unix:{socket_path}"],
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, python_path)),
            },
            path=str(directory),
        )
        return server, f"unix:{socket_path}"

    def exits(self, count: int) -> Deferred[None]:
        """
        Fire once the server has logged the exit of C{count} workers in all.
        """
        reached: Deferred[None] = Deferred()
        self._exit_waiters.append((count, reached))
        self._wake_exit_waiters()
        return reached

    def stop(self) -> None:
        """
        Stop the server gracefully, as an init system would.
        """
        if not self.ended.called:
            self.transport.signalProcess("TERM")

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self._partial[fd] = (self._partial[fd] + data).split(b"\n")
        for line in lines:
            self._line_received(line.decode("utf-8", "replace"))

    def _line_received(self, line: str) -> None:
        self.output.append(line)
        if "txtask server listening on" in line:
            self.listening.callback(None)
        elif ") exited with status " in line:
            self._exits += 1
            self._wake_exit_waiters()

    def _wake_exit_waiters(self) -> None:
        # A waiter's callbacks may add waiters: settle the list first.
        due = [reached for count, reached in self._exit_waiters if self._exits >= count]
        self._exit_waiters = [
            (count, reached)
            for count, reached in self._exit_waiters
            if self._exits < count
        ]
        for reached in due:
            reached.callback(None)

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(reason)
        self.ended.callback(None)


@dataclass
class Side:
    """
    One way of making calls, and what its rounds measured.

    @ivar calls: One call per connection.
    @ivar sequential: Seconds per call, one value per round.
    @ivar concurrent: Calls per second of all connections, one per round.
    """

    name: str
    calls: list[Call]
    sequential: list[float] = field(default_factory=list)
    concurrent: list[float] = field(default_factory=list)


@dataclass
class Figures:
    """
    What one run measured.

    @ivar cold_checkouts: Seconds each cold checkout took.
    """

    bare: Side
    txtask: Side
    cold_checkouts: list[float]


def bounded(waited: Deferred[Any], reactor: Any) -> Deferred[Any]:
    """
    Fail C{waited} with C{TimeoutError} after L{WAIT_LIMIT} seconds.
    """
    return waited.addTimeout(WAIT_LIMIT, reactor)


def run_calls(call: Call, count: int) -> Deferred[None]:
    """
    Make C{count} calls one after another, each once the previous answered.

    @return: A Deferred firing with C{None} after the last reply, or failing
        as the first failed call did.
    """
    finished: Deferred[None] = Deferred()
    remaining = count

    def next_call(_: object) -> None:
        nonlocal remaining
        if remaining == 0:
            finished.callback(None)
            return
        remaining -= 1
        call().addCallbacks(next_call, finished.errback)

    next_call(None)
    return finished


@inlineCallbacks
def time_calls(
    calls: list[Call], count: int, reactor: Any
) -> Generator[Deferred[Any], Any, float]:
    """
    Run C{count} sequential calls through each of C{calls}, all at once.

    @return: The seconds until the last reply.
    """
    started = time.perf_counter()
    yield bounded(gatherResults([run_calls(call, count) for call in calls]), reactor)
    return time.perf_counter() - started


def bare_call(connection: BareConnection) -> Call:
    return lambda: connection.echo(VALUE)


def txtask_call(checkout: txtask.Checkout) -> Call:
    return lambda: checkout.echo(VALUE)


@inlineCallbacks
def measure_held(
    reactor: Any, server: ServerProcess, endpoint: str, bare: list[BareWorker]
) -> Generator[Deferred[Any], Any, tuple[Side, Side]]:
    """
    Measure calls on held connections, bare and txtask rounds taking turns.

    @return: The bare side and the txtask side, their rounds measured.
    """
    client = txtask.Client(
        endpoint, min_workers=CONCURRENCY, max_workers=CONCURRENCY, reactor=reactor
    )
    checkouts = [client.checkout() for _ in range(CONCURRENCY)]
    sides = (
        Side("bare", [bare_call(worker.connection) for worker in bare]),
        Side("txtask", [txtask_call(checkout) for checkout in checkouts]),
    )

    # The first call on a worker imports the interface; keep that, and the
    # first use of every code path, out of the rounds.
    yield time_calls(sides[0].calls + sides[1].calls, WARM_UP_CALLS, reactor)

    for _ in range(ROUNDS):
        for side in sides:
            elapsed = yield time_calls(side.calls[:1], SEQUENTIAL_CALLS, reactor)
            side.sequential.append(elapsed / SEQUENTIAL_CALLS)
        for side in sides:
            elapsed = yield time_calls(side.calls, CONCURRENT_CALLS, reactor)
            side.concurrent.append(CONCURRENCY * CONCURRENT_CALLS / elapsed)

    for checkout in checkouts:
        checkout.release()
    yield client.close()
    yield bounded(server.exits(CONCURRENCY), reactor)
    return sides


@inlineCallbacks
def measure_cold(
    reactor: Any, server: ServerProcess, endpoint: str, exits_before: int
) -> Generator[Deferred[Any], Any, list[float]]:
    """
    Time L{COLD_REPEATS} checkouts that each need a new worker.

    A client with C{min_workers=0} and C{max_checkouts=1} keeps no worker
    idle and retires each one on release.

    @param exits_before: Workers the server saw exit before this.
    @return: Seconds from C{checkout()} to the reply, for each checkout.
    """
    client = txtask.Client(endpoint, min_workers=0, max_checkouts=1, reactor=reactor)
    elapsed = []
    try:
        for repeat in range(COLD_REPEATS):
            # The previous worker is gone, so it takes no CPU from this one.
            yield bounded(server.exits(exits_before + repeat), reactor)
            started = time.perf_counter()
            checkout = client.checkout()
            yield checkout.echo(VALUE)
            elapsed.append(time.perf_counter() - started)
            checkout.release()
    finally:
        yield client.close()
    return elapsed


@inlineCallbacks
def measure(reactor: Any) -> Generator[Deferred[Any], Any, Figures]:
    """
    Start the workers and the server, take every figure, stop them all.
    """
    with tempfile.TemporaryDirectory(prefix="txtask-bench-") as directory:
        server, endpoint = ServerProcess.start(reactor, Path(directory))
        bare = [BareWorker.start(reactor) for _ in range(CONCURRENCY)]
        try:
            yield bounded(server.listening, reactor)
            sides = yield measure_held(reactor, server, endpoint, bare)
            cold = yield measure_cold(reactor, server, endpoint, CONCURRENCY)
        except BaseException:
            print("\n".join(["txtask server output:", *server.output]), file=sys.stderr)
            raise
        finally:
            for worker in bare:
                worker.stop()
            server.stop()
            yield bounded(
                gatherResults([server.ended] + [worker.ended for worker in bare]),
                reactor,
            )
    return Figures(*sides, cold)


def describe_setup() -> list[str]:
    """
    Say where txtask comes from and how busy the machine is, warning when
    txtask is a source tree.
    """
    package = Path(txtask.__file__).resolve().parent
    lines = [
        f"txtask {metadata.version('txtask')} imported from {package}",
        f"Python {sys.version.split()[0]} ({sys.executable}), "
        f"Twisted {metadata.version('twisted')}, msgpack {metadata.version('msgpack')}",
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the "
        f"run (anything else running skews every figure)",
    ]
    if (package.parent / "pyproject.toml").exists():
        lines.append(
            "WARNING: this txtask is a source tree (an editable install or "
            "PYTHONPATH), so workers may recompile it at each start and the "
            "cold checkout figure is inflated. Measure from a regular install: "
            "python -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install "
            f"{package.parent} && /tmp/benchvenv/bin/python benchmarks/bench.py"
        )
    return lines


def paired_ratio(bare: list[float], txtask_: list[float]) -> float:
    """
    The median over rounds of txtask's figure over the bare one, each pair
    measured one after the other: the ratio least moved by drift in the
    machine's speed.
    """
    return statistics.median(t / b for b, t in zip(bare, txtask_, strict=True))


def report(figures: Figures) -> list[str]:
    """
    The figures side by side with their ratios and targets.
    """
    bare, txtask_ = figures.bare, figures.txtask
    bare_sequential = min(bare.sequential) * 1e6
    txtask_sequential = min(txtask_.sequential) * 1e6
    bare_concurrent = max(bare.concurrent)
    txtask_concurrent = max(txtask_.concurrent)
    cold = sorted(seconds * 1e3 for seconds in figures.cold_checkouts)

    row = "{:<32}{:>12}{:>12}{:>14}{:>12}"
    return [
        row.format("", "bare loop", "txtask", "txtask/bare", "target"),
        row.format(
            "sequential call, us per call",
            f"{bare_sequential:.1f}",
            f"{txtask_sequential:.1f}",
            f"{txtask_sequential / bare_sequential:.2f}x",
            "<= 1.25x",
        ),
        row.format(
            f"{CONCURRENCY} concurrent, calls per second",
            f"{bare_concurrent:,.0f}",
            f"{txtask_concurrent:,.0f}",
            f"{txtask_concurrent / bare_concurrent:.2f}x",
            ">= 0.85x",
        ),
        row.format(
            "cold checkout, ms", "-", f"{statistics.median(cold):.1f}", "-", "<= 25 ms"
        ),
        "",
        f"sequential: best of {ROUNDS} rounds of {SEQUENTIAL_CALLS} calls; "
        f"medians {statistics.median(bare.sequential) * 1e6:.1f} and "
        f"{statistics.median(txtask_.sequential) * 1e6:.1f} us, "
        f"paired ratio {paired_ratio(bare.sequential, txtask_.sequential):.2f}x",
        f"concurrent: best of {ROUNDS} rounds of {CONCURRENCY} x "
        f"{CONCURRENT_CALLS} calls; medians "
        f"{statistics.median(bare.concurrent):,.0f} and "
        f"{statistics.median(txtask_.concurrent):,.0f} calls/s, "
        f"paired ratio {paired_ratio(bare.concurrent, txtask_.concurrent):.2f}x",
        f"cold checkout: median of {COLD_REPEATS}, "
        f"from {cold[0]:.1f} to {cold[-1]:.1f} ms",
        "paired ratio: the median over rounds of txtask/bare, each pair measured "
        "back to back",
    ]


@inlineCallbacks
def main(reactor: IReactorCore) -> Generator[Deferred[Any], Any, None]:
    print("\n".join(describe_setup()), end="\n\n", flush=True)
    figures = yield measure(reactor)
    print("\n".join(report(figures)))


if __name__ == "__main__":
    task.react(main)
