"""
Tests for L{txtask._checkout}: ordered calls on one worker, errors, timer,
release and abort, against a recording pool and an in-memory worker.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from fakes import FakeWorker, failure_of, outcomes, result_of
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from txtask._checkout import Checkout, Counters, _CheckoutCore
from txtask._protocol import WorkerConnection
from txtask.errors import (
    CallSkipped,
    CheckoutAborted,
    CheckoutReleased,
    CheckoutTimeout,
    ClientClosed,
    ProtocolError,
    RemoteError,
    SetupError,
    WorkerDied,
)


class FakePool:
    """
    Records what a checkout asks of the pool; the test lends workers.
    """

    def __init__(
        self,
        name: str | None = None,
        refork_after_error: bool = True,
        leak_warning: float | None = None,
    ):
        self.reactor = Clock()
        self.name = name
        self.leak_warning = leak_warning
        self.connect_error: str | None = None
        self.counters = Counters()
        self.refork_after_error = refork_after_error
        self.requests: list[tuple[_CheckoutCore, bool]] = []
        self.withdrawn: list[_CheckoutCore] = []
        self.returned: list[tuple[WorkerConnection, bool]] = []
        self.discarded: list[WorkerConnection] = []
        self.reasons: list[str] = []

    def request_worker(self, core: _CheckoutCore, first: bool = False) -> None:
        self.requests.append((core, first))

    def withdraw(self, core: _CheckoutCore) -> None:
        self.withdrawn.append(core)

    def return_worker(self, connection: WorkerConnection, retire: bool) -> None:
        self.returned.append((connection, retire))

    def discard_worker(self, connection: WorkerConnection, reason: str) -> None:
        self.discarded.append(connection)
        self.reasons.append(reason)

    def lend(self, pid: int = 100) -> FakeWorker:
        """
        Give the latest checkout that asked a worker whose hello arrived.
        """
        worker = FakeWorker.connected(self.reactor, pid=pid)
        core, _ = self.requests[-1]
        core.worker_assigned(worker.protocol)
        return worker


def make_checkout(
    timeout: float | None = 5, **pool_options: Any
) -> tuple[Checkout, FakePool]:
    pool = FakePool(**pool_options)
    return Checkout(_CheckoutCore(pool, timeout)), pool


def call_frame(method: str | None, /, *args: Any, **kwargs: Any) -> list[Any]:
    return ["call", method, list(args), kwargs]


# Queueing and sending


def test_checkout_asks_for_a_worker_at_its_first_call_only() -> None:
    checkout, pool = make_checkout()
    assert pool.requests == []
    checkout.hash("a")
    checkout.hash("b")
    assert len(pool.requests) == 1
    assert pool.requests[0][1] is False


def test_checkout_sends_calls_one_at_a_time_in_order() -> None:
    checkout, pool = make_checkout()
    checkout.first(1)
    checkout.second(2)
    worker = pool.lend()
    assert worker.received() == [call_frame("first", 1)]
    worker.ok(None)
    assert worker.received() == [call_frame("second", 2)]


def test_checkout_reply_resolves_the_right_call() -> None:
    checkout, pool = make_checkout()
    first = outcomes(checkout.first())
    second = outcomes(checkout.second())
    worker = pool.lend()
    worker.ok("one")
    assert (first, second) == (["one"], [])
    worker.ok("two")
    assert (first, second) == (["one"], ["two"])


def test_checkout_sends_a_call_made_while_it_holds_an_idle_worker() -> None:
    checkout, pool = make_checkout()
    checkout.first()
    worker = pool.lend()
    worker.ok(None)
    worker.received()
    later = outcomes(checkout.later("x"))
    assert worker.received() == [call_frame("later", "x")]
    worker.ok("done")
    assert later == ["done"]


def test_checkout_call_made_in_a_callback_runs_next() -> None:
    checkout, pool = make_checkout()
    nested: list[Deferred[Any]] = []
    checkout.first().addCallback(lambda _: nested.append(checkout.second()))
    worker = pool.lend()
    worker.ok(None)
    assert worker.received()[-1] == call_frame("second")
    worker.ok(2)
    assert result_of(nested[0]) == 2


def test_checkout_direct_call_calls_the_interface() -> None:
    checkout, pool = make_checkout()
    checkout("arg", key=1)
    assert pool.lend().received() == [call_frame(None, "arg", key=1)]


def test_checkout_call_reaches_methods_named_like_its_own() -> None:
    checkout, pool = make_checkout()
    checkout.call("release", 1)
    assert pool.lend().received() == [call_frame("release", 1)]


KEYWORDS = ["name", "method", "self", "args", "kwargs"]


@pytest.mark.parametrize("keyword", KEYWORDS)
def test_checkout_call_passes_any_keyword_argument_name(keyword: str) -> None:
    checkout, pool = make_checkout()
    checkout.call("f", **{keyword: 1})
    assert pool.lend().received() == [call_frame("f", **{keyword: 1})]


@pytest.mark.parametrize("keyword", KEYWORDS)
def test_checkout_method_passes_any_keyword_argument_name(keyword: str) -> None:
    checkout, pool = make_checkout()
    checkout.g(**{keyword: 2})
    assert pool.lend().received() == [call_frame("g", **{keyword: 2})]


@pytest.mark.parametrize("keyword", KEYWORDS)
def test_checkout_direct_call_passes_any_keyword_argument_name(keyword: str) -> None:
    checkout, pool = make_checkout()
    checkout(**{keyword: 3})
    assert pool.lend().received() == [call_frame(None, **{keyword: 3})]


def test_checkout_does_not_proxy_private_attributes() -> None:
    checkout, pool = make_checkout()
    assert not hasattr(checkout, "_hidden")
    assert pool.requests == []


def test_checkout_call_sends_private_names_to_the_worker() -> None:
    """The worker refuses them; the checkout does not decide."""
    checkout, pool = make_checkout()
    checkout.call("_x")
    assert pool.lend().received() == [call_frame("_x")]


def test_checkout_call_fails_for_a_non_string_method_name() -> None:
    checkout, pool = make_checkout()
    assert isinstance(failure_of(checkout.call(42)), TypeError)  # type: ignore[arg-type]


def test_checkout_unencodable_argument_fails_at_once_and_sends_nothing() -> None:
    checkout, pool = make_checkout()
    error = failure_of(checkout.hash(object()))
    assert isinstance(error, TypeError)
    assert "hash()" in str(error)
    assert pool.requests == []


def test_checkout_goes_on_after_an_unencodable_argument() -> None:
    checkout, pool = make_checkout()
    checkout.hash(object())
    result = outcomes(checkout.hash("fine"))
    pool.lend().ok("hashed")
    assert result == ["hashed"]


def test_checkout_ids_are_unique() -> None:
    assert make_checkout()[0].checkout_id != make_checkout()[0].checkout_id


# Remote errors


def test_checkout_remote_error_carries_the_remote_facts() -> None:
    checkout, pool = make_checkout()
    failed = checkout.hash("pw")
    pool.lend().error("KeyError", "'user'", traceback="Traceback: here")
    error = failure_of(failed)
    assert type(error) is RemoteError
    assert (error.type_name, error.message, error.remote_traceback) == (
        "KeyError",
        "'user'",
        "Traceback: here",
    )
    assert error.method == "hash"
    assert "KeyError" in str(error) and "'user'" in str(error)


def test_checkout_keeps_its_worker_after_a_remote_error() -> None:
    checkout, pool = make_checkout()
    checkout.hash("pw")
    worker = pool.lend()
    worker.error()
    worker.received()
    rolled_back = outcomes(checkout.rollback())
    assert worker.received() == [call_frame("rollback")]
    worker.ok(True)
    assert rolled_back == [True]
    assert pool.discarded == []


def test_checkout_skips_calls_queued_behind_a_remote_error() -> None:
    checkout, pool = make_checkout()
    failed = checkout.first()
    skipped = checkout.second()
    worker = pool.lend()
    worker.error()
    cause = failure_of(failed)
    error = failure_of(skipped)
    assert isinstance(error, CallSkipped)
    assert error.cause is cause
    assert worker.received() == [call_frame("first")]


def test_checkout_runs_calls_made_in_the_errback() -> None:
    checkout, pool = make_checkout()
    retried: list[Deferred[Any]] = []
    checkout.first().addErrback(lambda _: retried.append(checkout.rollback()))
    worker = pool.lend()
    worker.error()
    assert worker.received()[-1] == call_frame("rollback")
    worker.ok("rolled back")
    assert result_of(retried[0]) == "rolled back"


def test_checkout_setup_error_is_a_remote_error() -> None:
    checkout, pool = make_checkout()
    failed = checkout.hash()
    pool.lend().error("OSError", "database is down", kind="setup")
    error = failure_of(failed)
    assert isinstance(error, SetupError)
    assert isinstance(error, RemoteError)
    assert "setup" in str(error)


# Release


def test_checkout_release_returns_the_worker_after_queued_calls() -> None:
    checkout, pool = make_checkout()
    checkout.first()
    checkout.second()
    worker = pool.lend()
    checkout.release()
    worker.ok(1)
    assert pool.returned == []
    worker.ok(2)
    assert pool.returned == [(worker.protocol, False)]
    assert worker.protocol.listener is None


def test_checkout_release_without_calls_only_withdraws() -> None:
    checkout, pool = make_checkout()
    checkout.release()
    assert pool.returned == []
    assert pool.requests == []
    assert len(pool.withdrawn) == 1


def test_checkout_call_after_release_fails_with_checkout_released() -> None:
    checkout, pool = make_checkout()
    checkout.release()
    error = failure_of(checkout.hash())
    assert isinstance(error, CheckoutReleased)
    assert "hash()" in str(error)


def test_checkout_release_twice_returns_the_worker_once() -> None:
    checkout, pool = make_checkout()
    checkout.hash()
    worker = pool.lend()
    worker.ok(None)
    checkout.release()
    checkout.release()
    assert pool.returned == [(worker.protocol, False)]


def test_checkout_release_in_a_callback_returns_the_worker_once() -> None:
    checkout, pool = make_checkout()
    checkout.hash().addCallback(lambda _: checkout.release())
    worker = pool.lend()
    worker.ok(None)
    assert pool.returned == [(worker.protocol, False)]


def test_checkout_retires_its_worker_after_an_error_by_default() -> None:
    checkout, pool = make_checkout()
    checkout.hash()
    worker = pool.lend()
    worker.error()
    checkout.release()
    assert pool.returned == [(worker.protocol, True)]


def test_checkout_keeps_its_worker_after_an_error_without_refork() -> None:
    checkout, pool = make_checkout(refork_after_error=False)
    checkout.hash()
    worker = pool.lend()
    worker.error()
    checkout.release()
    assert pool.returned == [(worker.protocol, False)]


def test_checkout_retires_its_worker_after_a_setup_error_even_without_refork() -> None:
    checkout, pool = make_checkout(refork_after_error=False)
    checkout.hash()
    worker = pool.lend()
    worker.error("OSError", "down", kind="setup")
    checkout.release()
    assert pool.returned == [(worker.protocol, True)]


def test_checkout_with_block_releases() -> None:
    checkout, pool = make_checkout()
    with checkout as held:
        held.hash()
        worker = pool.lend()
        worker.ok(None)
    assert pool.returned == [(worker.protocol, False)]


def test_checkout_with_block_releases_on_exception_without_retiring() -> None:
    """An exception in the caller's own code is not a worker error."""
    checkout, pool = make_checkout()
    with pytest.raises(KeyError):
        with checkout:
            checkout.hash()
            worker = pool.lend()
            worker.ok(None)
            raise KeyError("caller bug")
    assert pool.returned == [(worker.protocol, False)]


def test_checkout_async_with_block_releases() -> None:
    checkout, pool = make_checkout()
    worker: list[FakeWorker] = []

    async def use() -> None:
        async with checkout as held:
            held.hash()
            worker.append(pool.lend())
            worker[0].ok(None)

    result_of(Deferred.fromCoroutine(use()))
    assert pool.returned == [(worker[0].protocol, False)]


def test_checkout_leaves_no_timer_after_release() -> None:
    checkout, pool = make_checkout()
    checkout.hash()
    pool.lend().ok(None)
    checkout.release()
    assert pool.reactor.getDelayedCalls() == []


# Fatal errors


def test_checkout_worker_loss_fails_running_and_queued_calls() -> None:
    checkout, pool = make_checkout(name="hasher")
    running = checkout.first()
    queued = checkout.second()
    pool.lend(pid=77).die(ConnectionLost("gone"))
    error = failure_of(running)
    assert isinstance(error, WorkerDied)
    assert failure_of(queued) is error
    assert "worker 77" in str(error)
    assert "first()" in str(error)
    assert "'hasher'" in str(error)


def test_checkout_fatal_error_sticks_to_later_calls() -> None:
    checkout, pool = make_checkout()
    running = checkout.first()
    pool.lend().die()
    error = failure_of(running)
    assert failure_of(checkout.later()) is error
    assert failure_of(checkout()) is error


def test_checkout_lost_worker_goes_back_to_the_pool_as_discarded() -> None:
    """The pool must hear that the worker it lent is gone, to replace it."""
    checkout, pool = make_checkout()
    checkout.first()
    worker = pool.lend()
    worker.die()
    assert pool.discarded == [worker.protocol]


def test_checkout_worker_that_said_bye_goes_back_to_the_pool_as_discarded() -> None:
    checkout, pool = make_checkout()
    checkout.first()
    worker = pool.lend()
    worker.bye()
    assert pool.discarded == [worker.protocol]


def test_checkout_lost_worker_is_not_returned_on_release() -> None:
    checkout, pool = make_checkout()
    checkout.first()
    pool.lend().die()
    checkout.release()
    assert pool.returned == []


def test_checkout_protocol_error_is_fatal() -> None:
    checkout, pool = make_checkout()
    running = checkout.first()
    worker = pool.lend()
    worker.protocol.dataReceived(b"\x00\x00\x00\x01\xc1")
    error = failure_of(running)
    assert isinstance(error, ProtocolError)
    assert failure_of(checkout.later()) is error


def test_checkout_reply_to_no_call_is_a_protocol_error() -> None:
    checkout, pool = make_checkout()
    checkout.first()
    worker = pool.lend()
    worker.ok(1)
    worker.ok(2)
    assert isinstance(failure_of(checkout.later()), ProtocolError)
    assert pool.discarded == [worker.protocol]


def test_checkout_worker_loss_while_idle_in_the_checkout_is_fatal() -> None:
    checkout, pool = make_checkout()
    checkout.first()
    worker = pool.lend()
    worker.ok(None)
    worker.die()
    error = failure_of(checkout.later())
    assert isinstance(error, WorkerDied)
    assert "while the checkout held it" in str(error)


def test_checkout_bye_before_any_reply_asks_for_another_worker() -> None:
    """The leaving worker took none of its calls: no error, same order."""
    checkout, pool = make_checkout()
    first = outcomes(checkout.first())
    second = outcomes(checkout.second())
    pool.lend(pid=1).bye()
    assert first == second == []
    assert pool.requests[-1] == (pool.requests[0][0], True)
    replacement = pool.lend(pid=2)
    assert replacement.received() == [call_frame("first")]
    replacement.ok(1)
    replacement.ok(2)
    assert (first, second) == ([1], [2])


def test_checkout_bye_after_a_reply_is_worker_died() -> None:
    checkout, pool = make_checkout()
    checkout.first()
    queued = checkout.second()
    worker = pool.lend(pid=9)
    worker.ok(None)
    worker.bye()
    error = failure_of(queued)
    assert isinstance(error, WorkerDied)
    assert "worker 9" in str(error)
    assert failure_of(checkout.later()) is error


# Timeout


def test_checkout_timeout_fails_the_running_call() -> None:
    checkout, pool = make_checkout(timeout=5)
    running = checkout.hash()
    worker = pool.lend()
    pool.reactor.advance(5)
    error = failure_of(running)
    assert isinstance(error, CheckoutTimeout)
    assert "timed out after 5 seconds" in str(error)
    assert "hash()" in str(error)
    assert error.timeout == 5
    assert pool.discarded == [worker.protocol]


def test_checkout_timeout_not_reached_leaves_the_call_running() -> None:
    checkout, pool = make_checkout(timeout=5)
    running = outcomes(checkout.hash())
    pool.lend()
    pool.reactor.advance(4.9)
    assert running == []


def test_checkout_timeout_restarts_with_each_call() -> None:
    checkout, pool = make_checkout(timeout=5)
    checkout.first()
    worker = pool.lend()
    pool.reactor.advance(4)
    worker.ok(None)
    second = outcomes(checkout.second())
    pool.reactor.advance(4)
    assert second == []
    pool.reactor.advance(1)
    assert isinstance(second[0].value, CheckoutTimeout)


def test_checkout_timeout_restarts_as_a_queued_call_starts() -> None:
    checkout, pool = make_checkout(timeout=5)
    checkout.first()
    second = outcomes(checkout.second())
    worker = pool.lend()
    pool.reactor.advance(4)
    worker.ok(None)
    pool.reactor.advance(4)
    assert second == []
    pool.reactor.advance(1)
    assert isinstance(second[0].value, CheckoutTimeout)


def test_checkout_timeout_while_waiting_for_a_worker() -> None:
    checkout, pool = make_checkout(timeout=5, name="hasher")
    waiting = checkout.hash()
    pool.reactor.advance(5)
    error = failure_of(waiting)
    assert isinstance(error, CheckoutTimeout)
    assert "waiting for a worker" in str(error)
    assert "'hasher'" in str(error)
    assert pool.withdrawn == [pool.requests[0][0]]


def test_checkout_timeout_sticks() -> None:
    checkout, pool = make_checkout(timeout=5)
    error = outcomes(checkout.hash())
    pool.reactor.advance(5)
    assert failure_of(checkout.again()) is error[0].value


def test_checkout_timeout_none_sets_no_timer() -> None:
    checkout, pool = make_checkout(timeout=None)
    running = outcomes(checkout.hash())
    pool.lend()
    assert pool.reactor.getDelayedCalls() == []
    pool.reactor.advance(10**6)
    assert running == []


def test_checkout_timer_stops_when_the_last_reply_arrives() -> None:
    """
    An idle checkout can be held for any time; the next call gets the whole
    timeout again.
    """
    checkout, pool = make_checkout(timeout=5)
    checkout.hash()
    worker = pool.lend()
    worker.ok(None)
    pool.reactor.advance(100)
    later = outcomes(checkout.hash())
    pool.reactor.advance(4.9)
    assert later == []
    assert worker.received() == [call_frame("hash"), call_frame("hash")]
    pool.reactor.advance(0.2)
    assert isinstance(later[0].value, CheckoutTimeout)


# Cancel and abort


def test_checkout_cancel_fails_the_call_with_cancelled_error() -> None:
    checkout, pool = make_checkout()
    running = checkout.hash()
    pool.lend()
    running.cancel()
    assert isinstance(failure_of(running), CancelledError)


def test_checkout_cancel_aborts_queued_and_later_calls() -> None:
    checkout, pool = make_checkout()
    running = checkout.first()
    queued = checkout.second()
    worker = pool.lend()
    running.cancel()
    assert isinstance(failure_of(queued), CheckoutAborted)
    assert isinstance(failure_of(checkout.later()), CheckoutAborted)
    assert pool.discarded == [worker.protocol]
    assert pool.reactor.getDelayedCalls() == []


def test_checkout_cancel_of_a_queued_call_aborts_the_checkout() -> None:
    checkout, pool = make_checkout()
    running = checkout.first()
    queued = checkout.second()
    pool.lend()
    queued.cancel()
    assert isinstance(failure_of(queued), CancelledError)
    assert isinstance(failure_of(running), CheckoutAborted)


def test_checkout_cancel_after_the_reply_changes_nothing() -> None:
    checkout, pool = make_checkout()
    answered = checkout.first()
    worker = pool.lend()
    worker.ok("value")
    answered.cancel()
    assert result_of(answered) == "value"
    later = outcomes(checkout.later())
    worker.ok("later")
    assert later == ["later"]


def test_checkout_abort_fails_every_call_with_the_reason() -> None:
    checkout, pool = make_checkout()
    running = checkout.first()
    queued = checkout.second()
    worker = pool.lend()
    checkout.abort("user logged out")
    error = failure_of(running)
    assert isinstance(error, CheckoutAborted)
    assert error.reason == "user logged out"
    assert failure_of(queued) is error
    assert failure_of(checkout.later()) is error
    assert pool.discarded == [worker.protocol]


def test_checkout_abort_before_any_call_drops_nothing() -> None:
    checkout, pool = make_checkout()
    checkout.abort()
    assert isinstance(failure_of(checkout.hash()), CheckoutAborted)
    assert pool.requests == []
    assert pool.discarded == []


def test_checkout_abort_twice_keeps_the_first_error() -> None:
    checkout, pool = make_checkout()
    checkout.abort("first")
    checkout.abort("second")
    error = failure_of(checkout.hash())
    assert isinstance(error, CheckoutAborted)
    assert error.reason == "first"


def test_checkout_close_fails_calls_with_client_closed() -> None:
    checkout, pool = make_checkout(name="hasher")
    running = checkout.hash()
    core, _ = pool.requests[0]
    core.close()
    error = failure_of(running)
    assert isinstance(error, ClientClosed)
    assert "'hasher'" in str(error)


# Garbage collection


def test_checkout_collected_unreleased_is_released_with_a_warning() -> None:
    checkout, pool = make_checkout()
    checkout.hash()
    worker = pool.lend()
    worker.ok(None)
    checkout_id = checkout.checkout_id
    with capturedLogs() as events:
        del checkout
        gc.collect()
    [warning] = [e for e in events if e.get("checkout_id") == checkout_id]
    assert warning["log_level"] == LogLevel.warn
    assert pool.returned == [(worker.protocol, False)]


def test_checkout_collected_unreleased_finishes_its_running_call() -> None:
    checkout, pool = make_checkout()
    running = outcomes(checkout.hash())
    worker = pool.lend()
    del checkout
    gc.collect()
    worker.ok("late")
    assert running == ["late"]
    assert pool.returned == [(worker.protocol, False)]


def test_checkout_collected_after_release_logs_nothing() -> None:
    checkout, pool = make_checkout()
    checkout.hash()
    pool.lend().ok(None)
    checkout.release()
    with capturedLogs() as events:
        del checkout
        gc.collect()
    assert [e for e in events if e.get("log_level") == LogLevel.warn] == []
