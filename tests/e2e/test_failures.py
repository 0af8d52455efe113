"""
End to end: every failure rule, with real servers and real workers.
"""

from __future__ import annotations

import os
import select
import signal
import socket

import pytest
from pytest_twisted import ensureDeferred
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import globalLogPublisher

from txtask import (
    CallSkipped,
    CheckoutAborted,
    CheckoutTimeout,
    ClientClosed,
    Overloaded,
    RemoteError,
    WorkerDied,
)

#: Bound on waiting for an event that should come "at once".
PROMPT = 5


class _Exits:
    """
    Fire a Deferred when the server logs that a worker pid exited.
    """

    def __init__(self) -> None:
        self.exited: dict[int, dict] = {}
        self.waiters: dict[int, Deferred] = {}

    def __call__(self, event: dict) -> None:
        if "exited with status" in event.get("log_format", ""):
            self.exited[event["pid"]] = event
            waiter = self.waiters.pop(event["pid"], None)
            if waiter is not None:
                waiter.callback(event)

    def wait(self, pid: int) -> Deferred:
        if pid in self.exited:
            return Deferred.fromCoroutine(_value(self.exited[pid]))
        waiter = self.waiters[pid] = Deferred()
        return waiter.addTimeout(PROMPT, reactor)


async def _value(value):
    return value


@pytest.fixture
def exits():
    observer = _Exits()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def _bounded(d: Deferred, seconds: float = PROMPT) -> Deferred:
    return d.addTimeout(seconds, reactor)


@ensureDeferred
async def test_timeout_fails_call_and_kills_worker(start_server, make_client, exits):
    await start_server()
    client = make_client(min_workers=0)
    checkout = client.checkout(timeout=0.5)
    pid = await checkout.pid()
    with pytest.raises(CheckoutTimeout, match="timed out after 0.5 seconds") as raised:
        await checkout.sleep(60)
    timed_out = reactor.seconds()
    event = await exits.wait(pid)
    assert event["signal"] == signal.SIGKILL
    # The server hears the hangup and kills at once, not at its next check.
    assert reactor.seconds() - timed_out < 0.3

    # Fatal errors stick: the same error, at once.
    later = checkout.pid()
    assert later.called
    with pytest.raises(CheckoutTimeout) as again:
        await later
    assert again.value is raised.value
    checkout.release()


@ensureDeferred
async def test_timeout_restarts_with_each_call(start_server, make_client):
    """Three calls of 0.4 s each fit a 1 s timeout, since it restarts."""
    await start_server()
    client = make_client()
    with client.checkout(timeout=1) as checkout:
        for _ in range(3):
            assert await checkout.sleep(0.4) == 0.4


@ensureDeferred
async def test_timeout_none_waits(start_server, make_client):
    await start_server()
    client = make_client(timeout=0.1)
    with client.checkout(timeout=None) as checkout:
        assert await checkout.sleep(0.3) == 0.3


@ensureDeferred
async def test_timeout_while_every_worker_is_busy(start_server, make_client):
    await start_server()
    client = make_client(min_workers=1, max_workers=1)
    holder = client.checkout(timeout=10)
    await holder.pid()
    waiting = client.checkout(timeout=0.3)
    with pytest.raises(CheckoutTimeout, match="waiting for a worker"):
        await waiting.pid()
    # The checkout holding the worker is unharmed.
    assert await holder.identity("still mine") == "still mine"
    holder.release()


@ensureDeferred
async def test_timeout_when_server_never_reachable(make_client, tmp_path):
    client = make_client(f"unix:{tmp_path / 'nobody.sock'}")
    with client.checkout(timeout=0.3) as checkout:
        with pytest.raises(CheckoutTimeout, match="waiting for a worker") as raised:
            await checkout.pid()
    assert "nobody.sock" in str(raised.value)
    assert "No such file or directory" in str(raised.value)


@pytest.mark.parametrize(
    "death",
    ["sigkill", "segfault", "exit", "connection"],
)
@ensureDeferred
async def test_worker_death_fails_call_promptly(
    start_server, make_client, exits, death
):
    server = await start_server()
    client = make_client(min_workers=1, timeout=60)
    checkout = client.checkout()
    pid = await checkout.pid()
    began = reactor.seconds()
    if death == "sigkill":
        running = checkout.sleep(60)
        os.kill(pid, signal.SIGKILL)
    elif death == "segfault":
        running = checkout.segfault()
    elif death == "exit":
        running = checkout.exit_now(3)
    else:
        running = checkout.sleep(60)
        [worker] = [w for w in server._workers if w.pid == pid]
        with socket.fromfd(
            worker.connection_fd, socket.AF_UNIX, socket.SOCK_STREAM
        ) as s:
            s.shutdown(socket.SHUT_RDWR)
    with pytest.raises(WorkerDied):
        await _bounded(running)
    # Promptly: from the connection closing, not from any timer.
    assert reactor.seconds() - began < 0.5
    await exits.wait(pid)
    checkout.release()

    # The pool replaces the dead worker and never lends it again.
    pids = {await client.call("pid") for _ in range(3)}
    assert pid not in pids


@ensureDeferred
async def test_hung_worker_in_c_killed_with_its_children(
    start_server, make_client, exits, tmp_path, monkeypatch
):
    child_pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("TXTASK_TEST_CHILD_PID", str(child_pid_file))
    await start_server(hung_worker_timeout=0.5)
    client = make_client(min_workers=0, timeout=60)
    checkout = client.checkout()
    pid = await checkout.pid()
    with pytest.raises(WorkerDied):
        await _bounded(checkout.spawn_and_hang())
    event = await exits.wait(pid)
    assert event["signal"] == signal.SIGKILL
    assert _exits_soon(int(child_pid_file.read_text()))
    checkout.release()


def _exits_soon(pid: int) -> bool:
    """
    Whether the process exits within L{PROMPT} seconds.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], PROMPT)
    finally:
        os.close(pidfd)
    return bool(readable)


@ensureDeferred
async def test_abort_fails_running_and_queued_and_kills(
    start_server, make_client, exits
):
    await start_server()
    client = make_client(min_workers=0)
    checkout = client.checkout(timeout=30)
    pid = await checkout.pid()
    running = checkout.sleep(60)
    queued = checkout.pid()
    checkout.abort("user logged out")
    errors = []
    for call in (running, queued, checkout.pid()):
        with pytest.raises(CheckoutAborted, match="user logged out") as raised:
            await call
        assert raised.value.reason == "user logged out"
        errors.append(raised.value)
    # Sticky: every later call fails with the very same error.
    assert errors[0] is errors[1] is errors[2]
    await exits.wait(pid)


@ensureDeferred
async def test_cancel_fails_call_and_aborts_checkout(start_server, make_client, exits):
    await start_server()
    client = make_client(min_workers=0)
    checkout = client.checkout(timeout=30)
    pid = await checkout.pid()
    running = checkout.sleep(60)
    running.cancel()
    with pytest.raises(CancelledError):
        await running
    with pytest.raises(CheckoutAborted):
        await checkout.pid()
    await exits.wait(pid)
    checkout.release()


@ensureDeferred
async def test_remote_error_keeps_worker_and_skips_queued(start_server, make_client):
    await start_server()
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        pid = await checkout.pid()
        after_errback: list[Deferred] = []

        def make_more(failure):
            after_errback.append(checkout.identity("after"))
            return failure

        failing = checkout.fail("boom").addErrback(make_more)
        skipped = checkout.identity("skipped")
        with pytest.raises(RemoteError) as raised:
            await failing
        with pytest.raises(CallSkipped) as skipped_error:
            await skipped
        assert skipped_error.value.cause is raised.value
        assert await after_errback[0] == "after"
        assert await checkout.pid() == pid


@pytest.mark.parametrize(("refork", "same"), [(True, False), (False, True)])
@ensureDeferred
async def test_refork_after_error(start_server, make_client, refork, same):
    await start_server()
    client = make_client(min_workers=1, max_workers=1, refork_after_error=refork)
    with client.checkout(timeout=10) as checkout:
        first = await checkout.pid()
        with pytest.raises(RemoteError):
            await checkout.fail("x")
    assert (await client.call("pid") == first) is same


@pytest.mark.parametrize("retirement", ["error", "setup"])
@ensureDeferred
async def test_retiring_starts_the_replacement_at_once(
    start_server, make_client, retirement
):
    """Retiring after an error or a failed setup never shrinks the pool."""
    if retirement == "setup":
        await start_server(setup="sample:broken_setup")
    else:
        await start_server()
    client = make_client(min_workers=2, max_workers=2)
    checkout = client.checkout(timeout=10)
    with pytest.raises(RemoteError):
        await checkout.fail("x")
    checkout.release()
    stats = client.stats()
    assert stats["idle"] + stats["connecting"] == 2, stats


@ensureDeferred
async def test_max_checkouts_retires_worker(start_server, make_client):
    await start_server()
    client = make_client(min_workers=1, max_workers=1, max_checkouts=2)
    pids = []
    for _ in range(4):
        pids.append(await client.call("pid"))
        # The replacement is on its way as soon as the old worker goes.
        stats = client.stats()
        assert stats["idle"] + stats["connecting"] == 1, stats
    assert pids[0] == pids[1] != pids[2] == pids[3]


@ensureDeferred
async def test_overloaded_fails_fast(start_server, make_client):
    await start_server()
    client = make_client(min_workers=1, max_workers=1, max_pending_checkouts=1)
    holder = client.checkout(timeout=10)
    await holder.pid()
    waiting = client.checkout(timeout=10)
    queued = waiting.pid()
    with pytest.raises(Overloaded):
        client.checkout()
    with pytest.raises(Overloaded):
        await client.call("pid")
    holder.release()
    pid = await queued
    waiting.release()
    assert await client.call("pid") == pid


@ensureDeferred
async def test_close_fails_waiting_and_held(start_server, make_client):
    await start_server()
    client = make_client(min_workers=1, max_workers=1)
    holder = client.checkout(timeout=10)
    await holder.pid()
    running = holder.sleep(60)
    waiting = client.checkout(timeout=10).pid()
    await _bounded(client.close())
    for call in (running, waiting, holder.pid()):
        with pytest.raises(ClientClosed):
            await call
    assert pool_state(client) == {"idle": 0, "busy": 0, "connecting": 0, "waiting": 0}
    with pytest.raises(ClientClosed):
        client.checkout()


@ensureDeferred
async def test_close_closes_every_connection_and_idle_workers_leave(
    start_server, make_client, until
):
    server = await start_server()
    client = make_client(min_workers=3, max_workers=3)
    held = client.checkout(timeout=10)
    await held.pid()
    await until(lambda: client.stats()["idle"] == 2, what="two idle workers")
    await _bounded(client.close())
    # Each worker read the end of its stream, so none is left serving.
    await until(lambda: server.live_workers == 0, what="workers to exit")


@ensureDeferred
async def test_server_cap_bounds_live_workers(start_server, make_client):
    server = await start_server(max_workers=2)
    seen = []
    observer = lambda event: seen.append(server.live_workers)  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        client = make_client(min_workers=0, max_workers=6, max_checkouts=1)
        results = await DeferredList(
            [client.call("sleep", 0.05) for _ in range(12)], fireOnOneErrback=True
        )
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [value for _, value in results] == [0.05] * 12
    assert max(seen) == 2


@ensureDeferred
async def test_graceful_stop_lets_checkout_finish(
    start_server, make_client, exits, socket_path, events
):
    server = await start_server()
    client = make_client(min_workers=1)
    checkout = client.checkout(timeout=10)
    pid = await checkout.pid()
    running = checkout.sleep(0.3)
    stopped = server.stopService()
    # The socket goes at once, while the worker is still busy.
    await events.wait_for(lambda event: "no longer listening" in event["log_format"])
    assert not socket_path.exists()
    assert not running.called
    assert await running == 0.3
    assert await checkout.pid() == pid
    checkout.release()
    await _bounded(stopped)
    assert exits.exited[pid]["status"] == 0


@ensureDeferred
async def test_graceful_stop_kills_after_grace(start_server, make_client, exits):
    server = await start_server(shutdown_grace=0.2)
    client = make_client(min_workers=1)
    checkout = client.checkout(timeout=30)
    pid = await checkout.pid()
    running = checkout.sleep(60)
    await _bounded(server.stopService())
    assert exits.exited[pid]["signal"] == signal.SIGKILL
    with pytest.raises(WorkerDied):
        await running
    checkout.release()


def pool_state(client) -> dict:
    """The pool part of stats(): where each worker and checkout is now."""
    stats = client.stats()
    return {key: stats[key] for key in ("idle", "busy", "connecting", "waiting")}
