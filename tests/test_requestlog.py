"""
RequestLog on its own, and a checkout feeding it from fake workers.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from fakes import failure_of, outcomes, result_of
from test_checkout import FakePool, make_checkout
from twisted.logger import LogLevel, capturedLogs

from txtask import ProtocolError, RequestLog
from txtask._checkout import Checkout, _CheckoutCore
from txtask._requestlog import level_name


def test_request_log_entries_are_relative_to_start_and_in_time_order() -> None:
    log = RequestLog()
    start = log.start
    log.add_log(start + 2, "info", "second", pid=7)
    log.add_log(start + 1, "warn", "first", pid=8)
    log.add_timer("late", start + 3, start + 4, pid=7)
    log.add_timer("early", start + 0.5, start + 5, pid=8)
    assert log.as_dict() == {
        "start": start,
        "end": 5,
        "logs": [[1, "warn", "first", 8], [2, "info", "second", 7]],
        "timers": [["early", 0.5, 5, 8], ["late", 3, 4, 7]],
    }


def test_request_log_caller_methods_record_level_and_this_pid() -> None:
    log = RequestLog()
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    with log.timer("step"):
        pass
    dump = log.as_dict()
    assert [entry[1:] for entry in dump["logs"]] == [
        ["debug", "d", os.getpid()],
        ["info", "i", os.getpid()],
        ["warn", "w", os.getpid()],
        ["error", "e", os.getpid()],
    ]
    [[name, began, ended, pid]] = dump["timers"]
    assert (name, pid) == ("step", os.getpid())
    assert 0 <= began <= ended <= dump["end"]


def test_request_log_timer_records_even_when_the_step_raises() -> None:
    log = RequestLog()
    with pytest.raises(KeyError), log.timer("lookup"):
        raise KeyError("x")
    assert [timer[0] for timer in log.as_dict()["timers"]] == ["lookup"]


@pytest.mark.parametrize(
    ("levelno", "name"),
    [(5, "debug"), (10, "debug"), (20, "info"), (25, "info"), (30, "warn")]
    + [(40, "error"), (50, "critical"), (60, "critical")],
)
def test_level_name_maps_logging_levels(levelno: int, name: str) -> None:
    assert level_name(levelno) == name


def _logged_checkout(**pool: Any) -> tuple[Checkout, FakePool, RequestLog]:
    log = RequestLog()
    pool_ = FakePool(**pool)
    return Checkout(_CheckoutCore(pool_, 5, log)), pool_, log


def test_checkout_times_each_call_by_method_name() -> None:
    checkout, pool, log = _logged_checkout()
    checkout.hash("a")
    checkout("b")
    worker = pool.lend(pid=42)
    worker.ok(1)
    worker.error("remote", "ValueError", "no", "tb")
    assert [(t[0], t[3]) for t in log.as_dict()["timers"]] == [
        ("hash", os.getpid()),
        ("__call__", os.getpid()),
    ]


def test_checkout_replays_worker_records_and_timers() -> None:
    checkout, pool, log = _logged_checkout()
    running = checkout.hash("a")
    worker = pool.lend(pid=42)
    start = log.start
    events = [
        ["log", start + 0.1, 20, "app.db", "connected", None],
        ["timer", "sql", start + 0.2, start + 0.3],
        ["log", start + 0.4, 40, "app", "failed", "Traceback: boom"],
    ]
    with capturedLogs() as logged:
        worker.send(["ok", "hashed", events])
    assert result_of(running) == "hashed"
    remote = [e for e in logged if e["log_namespace"].startswith("txtask.remote.")]
    assert [(e["log_namespace"], e["log_level"], e["message"]) for e in remote] == [
        ("txtask.remote.app.db", LogLevel.info, "connected"),
        ("txtask.remote.app", LogLevel.error, "failed\nTraceback: boom"),
    ]
    for event in remote:
        assert event["worker_pid"] == 42
        assert event["method"] == "hash"
        assert event["checkout_id"] == checkout.checkout_id
    dump = log.as_dict()
    assert [entry[1:] for entry in dump["logs"]] == [
        ["info", "connected", 42],
        ["error", "failed\nTraceback: boom", 42],
    ]
    assert ["sql", 42] in [[t[0], t[3]] for t in dump["timers"]]


def test_checkout_replays_records_of_a_failed_call() -> None:
    checkout, pool, log = _logged_checkout()
    running = outcomes(checkout.hash("a"))
    worker = pool.lend(pid=42)
    record = ["log", log.start, 30, "app", "careful", None]
    worker.send(["error", "remote", "ValueError", "no", "tb", [record]])
    assert running[0].check(Exception)
    assert [entry[1:] for entry in log.as_dict()["logs"]] == [["warn", "careful", 42]]


def test_checkout_malformed_events_are_a_fatal_protocol_error() -> None:
    checkout, pool = make_checkout()
    running = checkout.hash("a")
    worker = pool.lend()
    worker.send(["ok", 1, [["log", "yesterday"]]])
    assert isinstance(failure_of(running), ProtocolError)
    assert pool.reasons == ["protocol"]


def test_checkout_lets_go_of_its_log_when_it_ends() -> None:
    checkout, pool, log = _logged_checkout()
    checkout.hash("a")
    pool.lend().ok(1)
    checkout.release()
    assert checkout._core._request_log is None


def test_checkout_leak_warning_fires_once_with_the_site() -> None:
    pool = FakePool(leak_warning=10)
    checkout = Checkout(_CheckoutCore(pool, 60, site="app.py:12"))
    checkout.hash("a")
    worker = pool.lend(pid=42)
    pool.reactor.advance(30)  # a call in flight is not a leak
    worker.ok(1)
    with capturedLogs() as logged:
        pool.reactor.advance(9)
        assert logged == []
        pool.reactor.advance(1)
        pool.reactor.advance(100)
    [warning] = logged
    assert warning["site"] == "app.py:12"
    assert warning["pid"] == 42
    assert warning["log_level"] == LogLevel.warn


def test_checkout_leak_watch_restarts_after_each_call() -> None:
    pool = FakePool(leak_warning=10)
    checkout = Checkout(_CheckoutCore(pool, 60, site="app.py:12"))
    checkout.hash("a")
    worker = pool.lend()
    worker.ok(1)
    pool.reactor.advance(8)
    checkout.hash("b")
    worker.ok(2)
    with capturedLogs() as logged:
        pool.reactor.advance(8)
        assert logged == []
        checkout.release()
        pool.reactor.advance(100)
    assert logged == []
    assert pool.reactor.getDelayedCalls() == []


def test_checkout_counts_calls_and_failures_by_class() -> None:
    checkout, pool = make_checkout()
    checkout.one()
    checkout.two()
    checkout.three()
    worker = pool.lend()
    worker.ok(1)
    worker.error("remote", "ValueError", "no", "tb")
    counters = pool.counters
    assert counters.calls_made == 3
    assert counters.checkouts_served == 1
    assert counters.calls_failed == {"RemoteError": 1, "CallSkipped": 1}
