"""
Tests for L{txtask._client.Client}: the pool of worker connections, the
queue of waiting checkouts, reconnection and close, on a memory reactor and
fake endpoints whose connections the tests complete by hand.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from fakes import FakeEndpoint, FakeWorker, failure_of, outcomes, result_of
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from zope.interface.verify import verifyObject

from txtask import _client, _wire
from txtask._client import Client
from txtask.errors import (
    CheckoutTimeout,
    ClientClosed,
    Overloaded,
    ProtocolError,
    RemoteError,
    SetupError,
    WorkerDied,
)


def make_client(
    **options: Any,
) -> tuple[Client, FakeEndpoint, MemoryReactorClock]:
    """
    A client of one fake endpoint; no standby workers unless asked.
    """
    reactor = MemoryReactorClock()
    endpoint = FakeEndpoint(reactor)
    options.setdefault("min_workers", 0)
    return Client(endpoint, reactor=reactor, **options), endpoint, reactor


def call_frame(method: str | None, /, *args: Any, **kwargs: Any) -> list[Any]:
    return ["call", method, list(args), kwargs]


def client_events(events: list[Any], level: LogLevel) -> list[Any]:
    """
    Events the client logged itself at C{level}.
    """
    return [
        event
        for event in events
        if event.get("log_level") == level
        and event.get("log_namespace") == "txtask._client.Client"
    ]


# The fake endpoint


def test_fake_endpoint_provides_istreamclientendpoint() -> None:
    assert verifyObject(IStreamClientEndpoint, FakeEndpoint(MemoryReactorClock()))


def test_fake_endpoint_accept_connects_the_factory_protocol() -> None:
    endpoint = FakeEndpoint(MemoryReactorClock())
    attempt = endpoint.connect(Factory.forProtocol(Protocol))
    endpoint.connect_only()
    protocol = result_of(attempt)
    assert protocol.transport is not None


def test_fake_endpoint_refuse_fails_the_attempt() -> None:
    endpoint = FakeEndpoint(MemoryReactorClock())
    attempt = endpoint.connect(Factory.forProtocol(Protocol))
    endpoint.refuse()
    assert isinstance(failure_of(attempt), ConnectionRefusedError)


def test_fake_endpoint_counts_cancelled_attempts() -> None:
    endpoint = FakeEndpoint(MemoryReactorClock())
    attempt = endpoint.connect(Factory.forProtocol(Protocol))
    attempt.cancel()
    assert isinstance(failure_of(attempt), CancelledError)
    assert (endpoint.cancelled, len(endpoint.attempts)) == (1, 0)


# Construction


def test_client_does_nothing_until_the_first_checkout() -> None:
    client, endpoint, reactor = make_client(min_workers=2)
    assert len(endpoint.attempts) == 0
    assert reactor.getDelayedCalls() == []


def test_client_opens_min_workers_connections_at_first_checkout() -> None:
    client, endpoint, _ = make_client(min_workers=2)
    client.checkout()
    assert len(endpoint.attempts) == 2
    assert client.stats()["connecting"] == 2


def test_client_lowers_min_workers_to_max_workers() -> None:
    client, endpoint, _ = make_client(min_workers=5, max_workers=2)
    client.checkout()
    assert client.min_workers == 2
    assert len(endpoint.attempts) == 2


def test_client_connects_endpoint_descriptions_with_its_reactor() -> None:
    reactor = MemoryReactorClock()
    client = Client("unix:/tmp/txtask-unit.sock", min_workers=1, reactor=reactor)
    client.checkout()
    assert [address for address, *_ in reactor.unixClients] == ["/tmp/txtask-unit.sock"]


@pytest.mark.parametrize(
    "options",
    [
        {"connect": []},
        {"max_workers": 0},
        {"min_workers": -1},
        {"max_checkouts": 0},
        {"max_pending_checkouts": -1},
        {"timeout": 0},
        {"timeout": -5},
        {"timeout": True},
        {"max_workers": 2.5},
    ],
    ids=repr,
)
def test_client_refuses_bad_settings(options: dict[str, Any]) -> None:
    options.setdefault("connect", "unix:txtask.sock")
    with pytest.raises(ValueError):
        Client(reactor=MemoryReactorClock(), **options)


def test_client_refuses_a_connect_target_that_is_no_endpoint() -> None:
    with pytest.raises(TypeError, match="42"):
        Client([42], reactor=MemoryReactorClock())  # type: ignore[list-item]


def test_client_checkout_refuses_a_bad_timeout() -> None:
    client, _, _ = make_client()
    with pytest.raises(ValueError):
        client.checkout(timeout=0)


# Lending workers


def test_client_sends_the_call_once_the_worker_said_hello() -> None:
    client, endpoint, _ = make_client()
    result = outcomes(client.checkout().hash("pw"))
    worker = endpoint.connect_only()
    assert worker.received() == []
    assert client.stats()["connecting"] == 1
    worker.hello(4242)
    assert worker.received() == [call_frame("hash", "pw")]
    worker.ok("hashed")
    assert result == ["hashed"]


def test_client_stats_count_idle_busy_connecting_and_waiting() -> None:
    client, endpoint, _ = make_client(max_workers=2)
    first = client.checkout()
    first.hash()
    second = client.checkout()
    second.hash()
    third = client.checkout()
    third.hash()
    assert pool_state(client) == {"idle": 0, "busy": 0, "connecting": 2, "waiting": 3}
    endpoint.accept()
    assert pool_state(client) == {"idle": 0, "busy": 1, "connecting": 1, "waiting": 2}


def test_client_release_returns_the_worker_to_the_pool() -> None:
    client, endpoint, _ = make_client()
    checkout = client.checkout()
    checkout.hash()
    worker = endpoint.accept()
    worker.ok(None)
    checkout.release()
    assert worker.received() == [call_frame("hash"), ["done"]]
    assert client.stats()["idle"] == 1
    assert not worker.closed


def test_client_reuses_an_idle_worker() -> None:
    client, endpoint, _ = make_client()
    first = client.checkout()
    first.hash()
    worker = endpoint.accept()
    worker.ok(None)
    first.release()
    worker.received()
    client.checkout().hash("again")
    assert worker.received() == [call_frame("hash", "again")]
    assert len(endpoint.attempts) == 0


def test_client_max_workers_caps_connections() -> None:
    client, endpoint, _ = make_client(max_workers=2)
    for _ in range(3):
        client.checkout().hash()
    assert len(endpoint.attempts) == 2
    assert client.stats()["waiting"] == 3


def test_client_waiting_checkouts_are_served_first_come_first_served() -> None:
    client, endpoint, _ = make_client(max_workers=1)
    holder = client.checkout()
    holder.first()
    worker = endpoint.accept()
    worker.ok(None)
    second = client.checkout()
    second.second()
    third = client.checkout()
    third.third()
    holder.release()
    assert worker.received() == [call_frame("first"), ["done"], call_frame("second")]
    worker.ok(None)
    second.release()
    assert worker.received() == [["done"], call_frame("third")]


def test_client_max_checkouts_retires_a_worker() -> None:
    client, endpoint, _ = make_client(max_checkouts=2)
    for number in range(2):
        checkout = client.checkout()
        checkout.hash()
        if number == 0:
            worker = endpoint.accept()
        worker.ok(None)
        checkout.release()
    assert worker.closed
    assert client.stats()["idle"] == 0


def test_client_replaces_a_retired_worker_to_keep_min_workers() -> None:
    client, endpoint, _ = make_client(min_workers=1, max_checkouts=1)
    checkout = client.checkout()
    checkout.hash()
    worker = endpoint.accept()
    worker.ok(None)
    checkout.release()
    assert worker.closed
    assert len(endpoint.attempts) == 1


def test_client_retires_a_worker_after_a_remote_error_by_default() -> None:
    client, endpoint, _ = make_client()
    checkout = client.checkout()
    checkout.hash()
    worker = endpoint.accept()
    worker.error()
    checkout.release()
    assert worker.closed
    assert worker.received() == [call_frame("hash")]


def test_client_keeps_a_worker_after_a_remote_error_without_refork() -> None:
    client, endpoint, _ = make_client(refork_after_error=False)
    checkout = client.checkout()
    failed = checkout.hash()
    worker = endpoint.accept()
    worker.error()
    assert isinstance(failure_of(failed), RemoteError)
    checkout.release()
    assert not worker.closed
    assert client.stats()["idle"] == 1


def test_client_retires_a_worker_after_a_setup_error_even_without_refork() -> None:
    client, endpoint, _ = make_client(refork_after_error=False)
    checkout = client.checkout()
    failed = checkout.hash()
    worker = endpoint.accept()
    worker.error("OSError", "database is down", kind="setup")
    assert isinstance(failure_of(failed), SetupError)
    checkout.release()
    assert worker.closed


def test_client_max_pending_checkouts_refuses_with_overloaded() -> None:
    client, endpoint, _ = make_client(max_workers=1, max_pending_checkouts=1)
    client.checkout().hash()
    with pytest.raises(Overloaded, match="max_pending_checkouts=1"):
        client.checkout()


def test_client_max_pending_checkouts_counts_only_waiting_checkouts() -> None:
    """A checkout that holds a worker is not pending."""
    client, endpoint, _ = make_client(max_workers=2, max_pending_checkouts=1)
    client.checkout().hash()
    endpoint.accept()
    client.checkout().hash()
    with pytest.raises(Overloaded):
        client.checkout()


def test_client_call_fails_with_overloaded() -> None:
    client, endpoint, _ = make_client(max_workers=1, max_pending_checkouts=1)
    client.checkout().hash()
    assert isinstance(failure_of(client.call("hash")), Overloaded)


# One-shot calls


def test_client_call_runs_on_an_idle_worker_and_releases() -> None:
    client, endpoint, _ = make_client(min_workers=1)
    client.checkout().release()
    worker = endpoint.accept()
    result = outcomes(client.call("hash", "pw", rounds=2))
    worker.ok("hashed")
    assert result == ["hashed"]
    assert worker.received() == [call_frame("hash", "pw", rounds=2), ["done"]]
    assert client.stats()["idle"] == 1


def test_client_call_waits_for_a_worker_then_runs() -> None:
    """The first call of a fresh client runs once a worker connects."""
    client, endpoint, _ = make_client()
    result = outcomes(client.call("hash", "pw"))
    worker = endpoint.accept()
    assert worker.received() == [call_frame("hash", "pw")]
    worker.ok("hashed")
    assert result == ["hashed"]


def test_client_call_passes_keyword_named_method() -> None:
    client, endpoint, _ = make_client()
    client.call("f", method="m")
    assert endpoint.accept().received()[:1] == [call_frame("f", method="m")]


# Worker loss and bye


def test_client_worker_death_fails_the_checkout() -> None:
    client, endpoint, _ = make_client()
    checkout = client.checkout()
    running = checkout.hash()
    endpoint.accept(pid=31).die(ConnectionLost("killed"))
    error = failure_of(running)
    assert isinstance(error, WorkerDied)
    assert "worker 31" in str(error)


def test_client_worker_death_frees_its_place_in_the_pool() -> None:
    """With max_workers=1, a dead worker must not block the next checkout."""
    client, endpoint, _ = make_client(max_workers=1)
    client.checkout().hash()
    endpoint.accept().die()
    assert client.stats()["busy"] == 0
    client.checkout().hash()
    assert len(endpoint.attempts) == 1


def test_client_bye_before_a_reply_moves_the_checkout_to_another_worker() -> None:
    client, endpoint, _ = make_client()
    result = outcomes(client.checkout().hash("pw"))
    endpoint.accept(pid=1).bye()
    assert result == []
    replacement = endpoint.accept(pid=2)
    assert replacement.received() == [call_frame("hash", "pw")]
    replacement.ok("hashed")
    assert result == ["hashed"]


def test_client_bye_before_a_reply_puts_the_checkout_first_in_line() -> None:
    client, endpoint, _ = make_client(max_workers=2)
    moved = client.checkout()
    moved.moved()
    leaving = endpoint.accept(pid=1)
    holder = client.checkout()
    holder.first()
    staying = endpoint.accept(pid=2)
    staying.ok(None)
    client.checkout().waiting()
    leaving.bye()
    holder.release()
    assert staying.received() == [call_frame("first"), ["done"], call_frame("moved")]


def test_client_bye_after_a_reply_is_worker_died() -> None:
    client, endpoint, _ = make_client()
    checkout = client.checkout()
    checkout.first()
    worker = endpoint.accept()
    worker.ok(None)
    worker.bye()
    assert isinstance(failure_of(checkout.second()), WorkerDied)


def test_client_bye_frees_its_place_in_the_pool() -> None:
    client, endpoint, _ = make_client(max_workers=1)
    client.checkout().hash()
    endpoint.accept().bye()
    assert client.stats()["busy"] == 0
    assert len(endpoint.attempts) == 1


def test_client_replaces_an_idle_worker_that_died() -> None:
    client, endpoint, _ = make_client(min_workers=1)
    client.checkout()
    worker = endpoint.accept()
    worker.die()
    assert client.stats()["idle"] == 0
    assert len(endpoint.attempts) == 1


def test_client_replaces_an_idle_worker_that_said_bye() -> None:
    client, endpoint, _ = make_client(min_workers=1)
    client.checkout()
    endpoint.accept().bye()
    assert client.stats()["idle"] == 0
    assert len(endpoint.attempts) == 1


def test_client_drops_an_idle_worker_that_speaks_unasked() -> None:
    client, endpoint, _ = make_client(min_workers=1)
    client.checkout()
    worker = endpoint.accept(pid=55)
    with capturedLogs() as events:
        worker.ok("surprise")
    assert worker.closed
    [warning] = client_events(events, LogLevel.warn)
    assert (warning["pid"], warning["verb"]) == (55, "ok")


def test_client_protocol_error_fails_the_call_and_drops_the_worker() -> None:
    client, endpoint, _ = make_client()
    running = client.checkout().hash()
    worker = endpoint.accept()
    worker.protocol.dataReceived(b"\x00\x00\x00\x01\xc1")
    assert isinstance(failure_of(running), ProtocolError)
    assert worker.closed


# Reaching the server


def next_attempt(reactor: MemoryReactorClock, endpoint: FakeEndpoint) -> float:
    """
    Advance time in small steps until the endpoint sees a connection
    attempt; return how long that took.
    """
    step = 0.005
    waited = 0.0
    while not endpoint.attempts:
        assert waited < 5, "no connection attempt within 5 seconds"
        reactor.advance(step)
        waited += step
    return waited


def test_client_retries_a_refused_endpoint_after_a_delay() -> None:
    client, endpoint, reactor = make_client(min_workers=1)
    client.checkout()
    endpoint.refuse()
    assert len(endpoint.attempts) == 0
    reactor.advance(_client.RETRY_INITIAL * 0.9)
    assert len(endpoint.attempts) == 0
    reactor.advance(_client.RETRY_INITIAL * 0.1)
    assert len(endpoint.attempts) == 1


def test_client_backoff_doubles_up_to_its_limit() -> None:
    client, endpoint, reactor = make_client(min_workers=1)
    client.checkout()
    delays = []
    for _ in range(7):
        endpoint.refuse()
        delays.append(next_attempt(reactor, endpoint))
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0], abs=0.006)


def test_client_backoff_starts_over_after_a_connection() -> None:
    client, endpoint, reactor = make_client(min_workers=1)
    client.checkout()
    for _ in range(3):
        endpoint.refuse()
        next_attempt(reactor, endpoint)
    endpoint.accept().die()
    endpoint.refuse()
    assert next_attempt(reactor, endpoint) == pytest.approx(
        _client.RETRY_INITIAL, abs=0.006
    )


def test_client_logs_an_unreachable_server_once_then_its_return() -> None:
    client, endpoint, reactor = make_client(min_workers=1)
    with capturedLogs() as events:
        client.checkout()
        for _ in range(3):
            endpoint.refuse()
            next_attempt(reactor, endpoint)
        endpoint.accept()
    [warning] = client_events(events, LogLevel.warn)
    assert warning["endpoint"] == repr(endpoint)
    [back] = client_events(events, LogLevel.info)
    assert back["endpoint"] == repr(endpoint)


def test_client_backs_off_when_a_connection_closes_before_hello() -> None:
    client, endpoint, reactor = make_client(min_workers=1)
    client.checkout()
    endpoint.connect_only().die()
    assert len(endpoint.attempts) == 0
    assert next_attempt(reactor, endpoint) == pytest.approx(
        _client.RETRY_INITIAL, abs=0.006
    )


def test_client_never_lends_a_worker_of_another_protocol_version() -> None:
    client, endpoint, reactor = make_client()
    running = outcomes(client.checkout().hash())
    worker = endpoint.connect_only()
    worker.send(["hello", _wire.PROTOCOL_VERSION + 1, 7])
    assert worker.received() == []
    assert running == []
    assert next_attempt(reactor, endpoint) == pytest.approx(
        _client.RETRY_INITIAL, abs=0.006
    )


def test_client_serves_a_waiting_checkout_once_the_server_is_up() -> None:
    client, endpoint, reactor = make_client()
    result = outcomes(client.checkout().hash())
    for _ in range(4):
        endpoint.refuse()
        next_attempt(reactor, endpoint)
    endpoint.accept().ok("finally")
    assert result == ["finally"]


def test_client_waiting_checkout_times_out_while_the_server_is_down() -> None:
    client, endpoint, reactor = make_client(timeout=5)
    running = outcomes(client.checkout().hash())
    endpoint.refuse()
    reactor.advance(5)
    assert isinstance(running[0].value, CheckoutTimeout)
    assert client.stats()["waiting"] == 0


def test_client_dead_endpoint_does_not_block_the_others() -> None:
    reactor = MemoryReactorClock()
    dead, alive = FakeEndpoint(reactor), FakeEndpoint(reactor)
    client = Client([dead, alive], min_workers=0, reactor=reactor)
    result = outcomes(client.checkout().hash())
    dead.refuse()
    alive.accept().ok("served")
    assert result == ["served"]


def test_client_spreads_workers_over_its_endpoints() -> None:
    reactor = MemoryReactorClock()
    first, second = FakeEndpoint(reactor), FakeEndpoint(reactor)
    client = Client([first, second], min_workers=2, reactor=reactor)
    client.checkout()
    assert (len(first.attempts), len(second.attempts)) == (1, 1)


# Timeouts and names


def test_client_checkout_uses_the_client_timeout() -> None:
    client, endpoint, reactor = make_client(timeout=7)
    running = outcomes(client.checkout().hash())
    endpoint.accept()
    reactor.advance(6.9)
    assert running == []
    reactor.advance(0.1)
    assert "timed out after 7 seconds" in str(running[0].value)


def test_client_checkout_timeout_overrides_the_client_timeout() -> None:
    client, endpoint, reactor = make_client(timeout=7)
    running = outcomes(client.checkout(timeout=2).hash())
    reactor.advance(2)
    assert isinstance(running[0].value, CheckoutTimeout)


def test_client_checkout_timeout_none_never_times_out() -> None:
    client, endpoint, reactor = make_client(timeout=7)
    running = outcomes(client.checkout(timeout=None).hash())
    endpoint.accept()
    reactor.advance(10**6)
    assert running == []


def test_client_name_appears_in_checkout_errors() -> None:
    client, endpoint, reactor = make_client(timeout=5, name="hasher")
    running = outcomes(client.checkout().hash())
    reactor.advance(5)
    assert "'hasher'" in str(running[0].value)


# Close


def test_client_close_fails_waiting_checkouts_with_client_closed() -> None:
    client, endpoint, _ = make_client(max_workers=1)
    client.checkout().first()
    endpoint.accept()
    waiting = client.checkout().second()
    client.close()
    assert isinstance(failure_of(waiting), ClientClosed)


def test_client_close_fails_calls_on_held_checkouts() -> None:
    client, endpoint, _ = make_client()
    checkout = client.checkout()
    running = checkout.first()
    worker = endpoint.accept()
    client.close()
    assert isinstance(failure_of(running), ClientClosed)
    assert isinstance(failure_of(checkout.second()), ClientClosed)
    assert worker.closed


def test_client_close_fails_the_first_call_of_a_checkout_taken_before() -> None:
    client, endpoint, _ = make_client()
    checkout = client.checkout()
    client.close()
    assert isinstance(failure_of(checkout.hash()), ClientClosed)


def test_client_close_fires_once_connections_are_closed() -> None:
    client, endpoint, reactor = make_client(min_workers=1)
    client.checkout()
    worker = endpoint.accept()
    closed = outcomes(client.close())
    assert worker.closed
    assert closed == []
    reactor.advance(0)
    assert closed == [None]


def test_client_close_waits_for_connections_held_by_checkouts() -> None:
    client, endpoint, reactor = make_client()
    client.checkout().hash()
    worker = endpoint.accept()
    closed = outcomes(client.close())
    assert worker.closed
    assert closed == []
    reactor.advance(0)
    assert closed == [None]


def test_client_close_cancels_connection_attempts() -> None:
    client, endpoint, _ = make_client(min_workers=2)
    client.checkout()
    closed = outcomes(client.close())
    assert endpoint.cancelled == 2
    assert closed == [None]


def test_client_close_drops_connections_that_have_not_said_hello() -> None:
    client, endpoint, reactor = make_client(min_workers=1)
    client.checkout()
    worker = endpoint.connect_only()
    closed = outcomes(client.close())
    reactor.advance(0)
    assert worker.closed
    assert closed == [None]


def test_client_close_leaves_no_delayed_calls() -> None:
    client, endpoint, reactor = make_client(max_workers=1, timeout=30)
    client.checkout().first()
    endpoint.refuse()
    assert reactor.getDelayedCalls() != []
    client.close()
    reactor.advance(0)
    assert reactor.getDelayedCalls() == []


def test_client_close_twice_fires_both_together() -> None:
    client, endpoint, reactor = make_client(min_workers=1)
    client.checkout()
    endpoint.accept()
    first = outcomes(client.close())
    second = outcomes(client.close())
    assert (first, second) == ([], [])
    reactor.advance(0)
    assert (first, second) == ([None], [None])


def test_client_checkout_after_close_raises_client_closed() -> None:
    client, _, _ = make_client()
    client.close()
    with pytest.raises(ClientClosed):
        client.checkout()


def test_client_call_after_close_fails_with_client_closed() -> None:
    client, _, _ = make_client()
    client.close()
    assert isinstance(failure_of(client.call("hash")), ClientClosed)


# Garbage collection


def test_client_checkout_collected_unreleased_returns_its_worker() -> None:
    client, endpoint, _ = make_client()
    checkout = client.checkout()
    checkout.hash()
    worker = endpoint.accept()
    worker.ok(None)
    checkout_id = checkout.checkout_id
    with capturedLogs() as events:
        del checkout
        gc.collect()
    [warning] = [e for e in events if e.get("checkout_id") == checkout_id]
    assert warning["log_level"] == LogLevel.warn
    assert client.stats()["idle"] == 1
    assert worker.received()[-1] == ["done"]


def test_client_every_call_deferred_fires_exactly_once() -> None:
    """A busy mix of replies, errors, skips and a death: each call fires once."""
    client, endpoint, reactor = make_client(max_workers=1, timeout=5)
    checkout = client.checkout()
    calls = [outcomes(checkout.step(n)) for n in range(3)]
    worker: FakeWorker = endpoint.accept()
    worker.ok(0)
    worker.error()
    calls.append(outcomes(checkout.after()))
    worker.die()
    calls.append(outcomes(checkout.late()))
    other = outcomes(client.checkout().wait())
    reactor.advance(5)
    assert [len(fired) for fired in calls] == [1, 1, 1, 1, 1]
    assert len(other) == 1


def pool_state(client) -> dict:
    """The pool part of stats(): where each worker and checkout is now."""
    stats = client.stats()
    return {key: stats[key] for key in ("idle", "busy", "connecting", "waiting")}
