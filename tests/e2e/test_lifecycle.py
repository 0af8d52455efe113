"""
End to end: server start and stop, setup, checkouts before the server is
up, release, and the twistd plugin, with real workers.
"""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_twisted import ensureDeferred

from txtask import SetupError


@ensureDeferred
async def test_unix_socket_owner_only_and_removed_on_stop(start_server, socket_path):
    old_umask = os.umask(0)
    try:
        server = await start_server()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    await server.stopService()
    assert not socket_path.exists()


@ensureDeferred
async def test_worker_exit_leaves_socket(start_server, make_client, socket_path):
    """A worker retired by the client exits without removing the socket."""
    server = await start_server()
    client = make_client(min_workers=0, max_checkouts=1)
    first = await client.call("pid")
    second = await client.call("pid")
    assert first != second
    assert socket_path.exists()
    assert await client.call("identity", 1) == 1
    del server


@ensureDeferred
async def test_server_logs_worker_start_exit_and_stderr(
    start_server, make_client, events
):
    await start_server()
    client = make_client(min_workers=0, max_checkouts=1)
    pid = await client.call("pid")
    await client.call("write_stderr", "hello from the worker")

    def is_exit(event):
        return "exited with status" in event.get("log_format", "") and (
            event.get("pid") == pid
        )

    exited = await events.wait_for(is_exit)
    started = [
        e for e in events.events if "started with pid" in e.get("log_format", "")
    ]
    lines = await events.wait_for(lambda e: e.get("line") == "hello from the worker")
    assert any(e["pid"] == pid for e in started)
    assert exited["status"] == 0
    assert lines["stream"] == "stderr"
    assert isinstance(lines["worker_id"], int)


@ensureDeferred
async def test_setup_runs_once_per_worker(start_server, make_client):
    await start_server(setup="sample:setup")
    client = make_client(min_workers=1, max_workers=1)
    with client.checkout(timeout=10) as checkout:
        assert await checkout.setup_runs() == 1
        assert await checkout.setup_runs() == 1
    assert await client.call("setup_runs") == 1


@ensureDeferred
async def test_setup_error_reaches_caller_and_retires_worker(start_server, make_client):
    await start_server(setup="sample:broken_setup")
    client = make_client(min_workers=0, refork_after_error=False)
    with client.checkout(timeout=10) as checkout:
        with pytest.raises(SetupError) as raised:
            await checkout.pid()
        with pytest.raises(SetupError):
            await checkout.pid()
    assert raised.value.type_name == "RuntimeError"
    assert "database is down" in str(raised.value)
    assert "broken_setup" in raised.value.remote_traceback

    # The worker is retired although refork_after_error is off.
    assert client.stats()["idle"] == 0


@ensureDeferred
async def test_checkout_before_server_starts_is_served(start_server, make_client):
    client = make_client()
    checkout = client.checkout(timeout=20)
    answer = checkout.identity("early")
    assert not answer.called
    await start_server()
    assert await answer == "early"
    checkout.release()


@ensureDeferred
async def test_dead_endpoint_does_not_block_live_one(
    start_server, make_client, tmp_path
):
    await start_server()
    live = f"unix:{tmp_path / 'txtask.sock'}"
    dead = f"unix:{tmp_path / 'nobody-listens.sock'}"
    client = make_client([dead, live], min_workers=2)
    results = [await client.call("identity", n) for n in range(6)]
    assert results == list(range(6))


@ensureDeferred
async def test_with_blocks_release(start_server, make_client):
    await start_server()
    client = make_client(min_workers=1, max_workers=1)
    with client.checkout(timeout=10) as checkout:
        await checkout.pid()
    async with client.checkout(timeout=10) as checkout:
        await checkout.pid()
    assert client.stats()["busy"] == 0
    assert client.stats()["idle"] == 1


@ensureDeferred
async def test_with_block_releases_on_caller_exception(start_server, make_client):
    """An exception in the caller's code releases the worker for reuse."""
    await start_server()
    client = make_client(min_workers=1, max_workers=1)
    with pytest.raises(KeyError):
        with client.checkout(timeout=10) as checkout:
            first = await checkout.pid()
            raise KeyError("caller's own bug")
    assert await client.call("pid") == first


@ensureDeferred
async def test_garbage_collected_checkout_released_with_warning(
    start_server, make_client, events
):
    await start_server()
    client = make_client(min_workers=1, max_workers=1)
    checkout = client.checkout(timeout=10)
    first = await checkout.pid()
    checkout_id = checkout.checkout_id
    del checkout
    gc.collect()
    warnings = [
        e
        for e in events.events
        if e.get("checkout_id") == checkout_id and e["log_level"].name == "warn"
    ]
    assert len(warnings) == 1
    assert await client.call("pid") == first


def test_worker_module_import_leaves_twisted_unloaded():
    code = (
        "import sys, txtask.worker, txtask.errors, txtask._wire;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert output.strip() == "[]"


def test_demo_prints_both_examples():
    result = subprocess.run(
        [sys.executable, "-m", "txtask.demo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Hashed password is $2b$10$")
    assert lines[1:] == [
        "Verify result is True",
        "username: jimmy, email: jimmy@example.com",
    ]


def test_twistd_lists_plugin(tmp_path):
    """
    The installed twistd script finds the plugin as a user runs it: from any
    directory, with no PYTHONPATH. (An editable install hides the plugin from
    twistd, which is why the README installs the package normally.)
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    output = subprocess.run(
        [str(Path(sys.executable).parent / "twistd"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=env,
    ).stdout
    assert any(line.split()[:1] == ["txtask"] for line in output.splitlines())


@ensureDeferred
async def test_twistd_serves_password_example(twistd, make_client):
    from txtask.examples import passwords_client

    await twistd("--interface", "txtask.examples.passwords", "--name", "e2e")
    client = make_client(min_workers=1)
    lines: list[str] = []
    await passwords_client.run(client, lines.append)
    assert lines[0].startswith("Hashed password is $2b$10$")
    assert lines[1] == "Verify result is True"


@ensureDeferred
async def test_twistd_serves_dbi_example(twistd, make_client, tmp_path, monkeypatch):
    from txtask.examples import dbi_client

    monkeypatch.setenv("TXTASK_EXAMPLE_DB", str(tmp_path / "example.db"))
    await twistd(
        "--interface",
        "txtask.examples.dbi",
        "--setup",
        "txtask.examples.dbi:setup",
        "--checkout-done",
        "txtask.examples.dbi:rollback",
    )
    client = make_client(min_workers=1)
    lines: list[str] = []
    await dbi_client.run(client, lines.append)
    assert lines == ["username: jimmy, email: jimmy@example.com"]


@ensureDeferred
async def test_twistd_sigterm_removes_socket(twistd, socket_path, make_client):
    server = await twistd("--interface", "sample")
    assert socket_path.exists()
    # twistd starts the service before its reactor runs and installs its
    # signal handlers: a served call shows that it does now.
    await make_client(min_workers=0).call("pid")
    server.transport.signalProcess("TERM")
    await server.ended
    assert not socket_path.exists(), server.output.decode()
