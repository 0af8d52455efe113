"""
End to end: what workers log reaches the client; RequestLog, titles, stats
and the leaked checkout warning.
"""

from __future__ import annotations

import gc
import os
import signal
import weakref
from pathlib import Path

import pytest
from pytest_twisted import ensureDeferred
from twisted.logger import LogLevel

from txtask import (
    CheckoutAborted,
    CheckoutTimeout,
    RemoteError,
    RequestLog,
    SetupError,
    WorkerDied,
)


def _remote(events, namespace: str) -> list[dict]:
    return [e for e in events.events if e.get("log_namespace") == namespace]


@ensureDeferred
async def test_worker_records_reach_client_log_with_fields(
    start_server, make_client, events
):
    await start_server("logs")
    client = make_client(min_workers=1)
    checkout = client.checkout(timeout=10)
    pid = await checkout.pid()
    assert await checkout.work(21) == 42
    checkout.release()

    records = _remote(events, "txtask.remote.logs.iface")
    assert [(e["message"], e["log_level"]) for e in records] == [
        ("working on 21", LogLevel.info),
        ("inside the inner step", LogLevel.warn),
    ]
    for record in records:
        assert record["worker_pid"] == pid
        assert record["method"] == "work"
        assert record["checkout_id"] == checkout.checkout_id


@pytest.mark.parametrize(
    ("level", "captured"),
    [
        (
            "DEBUG",
            ["below the captured level", "working on 21", "inside the inner step"],
        ),
        ("WARNING", ["inside the inner step"]),
    ],
)
@ensureDeferred
async def test_log_level_sets_what_workers_capture(
    start_server, make_client, events, level, captured
):
    await start_server("logs", log_level=level)
    client = make_client(min_workers=1)
    assert await client.call("work", 21) == 42
    records = _remote(events, "txtask.remote.logs.iface")
    assert [e["message"] for e in records] == captured


@ensureDeferred
async def test_records_are_captured_once_logging_is_first_imported(
    start_server, make_client, events
):
    """A worker starts without logging; the call that imports it is captured."""
    await start_server("sample")
    client = make_client(min_workers=1)
    checkout = client.checkout(timeout=10)
    assert await checkout.loaded("logging") == []
    assert await checkout.log_after_importing_logging("late") == "late"
    checkout.release()

    [record] = _remote(events, "txtask.remote.sample.late")
    assert record["message"] == "late"
    assert record["method"] == "log_after_importing_logging"


@ensureDeferred
async def test_records_of_a_failing_call_arrive_with_exception_text(
    start_server, make_client, events
):
    await start_server("logs")
    client = make_client(min_workers=1)
    with pytest.raises(RemoteError, match="bad input"):
        await client.call("fail")
    records = _remote(events, "txtask.remote.logs.iface")
    assert [(e["log_level"], e["method"]) for e in records] == [
        (LogLevel.error, "fail"),
        (LogLevel.error, "fail"),
    ]
    assert records[0]["message"] == "about to fail"
    assert records[1]["message"].startswith("caught it\nTraceback")
    assert "ZeroDivisionError" in records[1]["message"]


@ensureDeferred
async def test_records_of_a_failing_setup_reach_the_caller(
    start_server, make_client, events
):
    await start_server("logs", setup="logs:failing_setup")
    client = make_client(min_workers=0)
    with pytest.raises(SetupError, match="no database"):
        await client.call("work", 1)
    [record] = _remote(events, "txtask.remote.logs.setup")
    assert record["message"] == "setup cannot reach the database"
    assert record["log_level"] == LogLevel.warn
    assert record["method"] == "work"


@ensureDeferred
async def test_records_outside_requests_go_to_the_server_log(
    start_server, make_client, events
):
    """The import-time warning is on the worker's stderr, so the server's."""
    await start_server("logs")
    client = make_client(min_workers=1)
    pid = await client.call("pid")
    line = await events.wait_for(
        lambda e: e.get("pid") == pid and "logs interface imported" in e.get("line", "")
    )
    assert line["stream"] == "stderr"
    assert _remote(events, "txtask.remote.logs.iface") == []


@ensureDeferred
async def test_request_log_collects_everything_in_order(start_server, make_client):
    await start_server("logs", setup="logs:setup")
    client = make_client(min_workers=0)
    log = RequestLog()
    checkout = client.checkout(timeout=10, log=log)
    log.info("request started")
    pid = await checkout.pid()
    await checkout.work(1)
    with log.timer("client step"):
        await checkout.work(2)
    log.warn("request done")
    checkout.release()
    dump = log.as_dict()

    me = os.getpid()
    assert [(level, message, who) for _, level, message, who in dump["logs"]] == [
        ("info", "request started", me),
        ("info", "working on 1", pid),
        ("warn", "inside the inner step", pid),
        ("info", "working on 2", pid),
        ("warn", "inside the inner step", pid),
        ("warn", "request done", me),
    ]
    assert [(name, who) for name, _, _, who in dump["timers"]] == [
        ("pid", me),
        ("work", me),
        ("inner", pid),
        ("client step", me),
        ("work", me),
        ("inner", pid),
    ]
    times = [entry[0] for entry in dump["logs"]]
    assert times == sorted(times) and times[0] >= 0
    for _, began, ended, _ in dump["timers"]:
        assert 0 <= began <= ended <= dump["end"]
    assert dump["start"] == log.start


@pytest.mark.parametrize("ending", ["timeout", "abort", "death"])
@ensureDeferred
async def test_request_log_is_dropped_after_a_fatal_error(
    start_server, make_client, ending
):
    await start_server("logs")
    client = make_client(min_workers=1)
    log = RequestLog()
    checkout = client.checkout(timeout=0.3 if ending == "timeout" else 10, log=log)
    pid = await checkout.pid()
    running = checkout.sleep(30)
    if ending == "abort":
        checkout.abort("enough")
    elif ending == "death":
        os.kill(pid, signal.SIGKILL)
    expected = {
        "timeout": CheckoutTimeout,
        "abort": CheckoutAborted,
        "death": WorkerDied,
    }
    with pytest.raises(expected[ending]):
        await running
    collected = weakref.ref(log)
    del log
    gc.collect()

    # The checkout itself is still alive; the client let go of its log.
    assert checkout.checkout_id > 0
    assert collected() is None


@ensureDeferred
async def test_printed_output_is_logged_by_the_server(
    start_server, make_client, events
):
    await start_server("logs")
    client = make_client(min_workers=1)
    checkout = client.checkout(timeout=10)
    pid = await checkout.pid()
    assert await checkout.chatty() == "still fine"
    assert await checkout.work(1) == 2
    checkout.release()
    for stream in ("stdout", "stderr"):
        line = await events.wait_for(
            lambda e, stream=stream: (
                e.get("pid") == pid and e.get("line") == f"printed to {stream}"
            )
        )
        assert line["stream"] == stream
        assert isinstance(line["worker_id"], int)


def _title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@ensureDeferred
async def test_process_titles_name_server_and_worker_state(twistd, make_client, until):
    server = await twistd("--interface", "logs", "--name", "e2e-titles")
    assert _title(server.transport.pid).startswith("txtask-server: e2e-titles")
    client = make_client(min_workers=1)
    checkout = client.checkout(timeout=10)
    pid = await checkout.pid()
    await until(lambda: "idle" in _title(pid), what=_title(pid))
    assert _title(pid).startswith("txtask-worker: e2e-titles (1) idle")
    sleeping = checkout.sleep(2)
    await until(lambda: "busy" in _title(pid), what=_title(pid))
    assert _title(pid).startswith("txtask-worker: e2e-titles (1) busy: sleep")
    await sleeping
    assert _title(pid).startswith("txtask-worker: e2e-titles (1) idle")
    checkout.release()


@ensureDeferred
async def test_stats_count_a_scripted_scenario(start_server, make_client):
    await start_server("logs")
    client = make_client(min_workers=1, max_workers=2, max_checkouts=2)
    before = client.stats()
    assert before["checkouts_served"] == before["calls_made"] == 0

    await client.call("work", 1)
    with pytest.raises(RemoteError):
        await client.call("fail")
    await client.call("work", 2)
    await client.call("work", 3)
    timing_out = client.checkout(timeout=0.3)
    with pytest.raises(CheckoutTimeout):
        await timing_out.sleep(30)
    aborted = client.checkout(timeout=10)
    await aborted.pid()
    aborted.abort("enough")

    # Both workers held, a third checkout waiting; then one holder's worker
    # dies and the waiting checkout gets the replacement.
    first, second = client.checkout(timeout=10), client.checkout(timeout=10)
    pid = await first.pid()
    await second.pid()
    third = client.checkout(timeout=10)
    queued = third.pid()
    pool = client.stats()
    assert [pool[key] for key in ("idle", "busy", "connecting", "waiting")] == [
        0,
        2,
        0,
        1,
    ]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerDied):
        await first.pid()
    await queued
    for checkout in (first, second, third):
        checkout.release()

    stats = client.stats()
    assert stats["checkouts_served"] == 9
    assert stats["calls_made"] == 10
    assert stats["calls_failed"] == {
        "RemoteError": 1,
        "CheckoutTimeout": 1,
        "WorkerDied": 1,
    }
    retired = stats["workers_retired"]
    assert (retired["error"], retired["timeout"], retired["abort"]) == (1, 1, 1)
    # work(2) and work(3) ran on one fresh worker: its second checkout.
    assert retired["max_checkouts"] >= 1
    assert retired["death"] == 1
    assert stats["workers_started"] >= 5


@ensureDeferred
async def test_leaked_checkout_is_reported_once_with_its_site(
    start_server, make_client, events
):
    await start_server("logs")
    client = make_client(min_workers=1, leak_warning=0.2)
    checkout = client.checkout(timeout=10)  # the site the warning names
    line = _this_line() - 1
    pid = await checkout.pid()
    warning = await events.wait_for(lambda e: "held worker" in e.get("log_format", ""))
    assert warning["site"] == f"{__file__}:{line}"
    assert warning["pid"] == pid
    assert warning["log_level"] == LogLevel.warn
    # A call in flight is not a leak, and the warning is not repeated.
    assert await checkout.work(1) == 2
    checkout.release()
    assert (
        len([e for e in events.events if "held worker" in e.get("log_format", "")]) == 1
    )


def _this_line() -> int:
    import sys

    return sys._getframe(1).f_lineno
