"""
End to end: values, interface kinds and call ordering, with real workers.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest
from pytest_twisted import ensureDeferred
from twisted.internet.defer import Deferred, gatherResults

from txtask import CheckoutReleased, RemoteError


@ensureDeferred
async def test_values_round_trip(start_server, make_client):
    """Every supported type comes back as it went, tuples as lists."""
    await start_server()
    client = make_client()
    when = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=timezone(timedelta(hours=2)))
    values = [
        None,
        True,
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        2**200,
        -(2**200),
        1.5,
        float("inf"),
        "",
        "plain",
        "astral \U0001f600 \U00010348",
        b"",
        b"\x00\xff bytes",
        [1, [2, [3]]],
        (1, 2),
        {"key": [1, {"nested": b"x"}], 3: "int key"},
        when,
    ]
    with client.checkout(timeout=10) as checkout:
        for value in values:
            result = await checkout.identity(value)
            expected = list(value) if isinstance(value, tuple) else value
            assert result == expected
            assert type(result) is type(expected)
        returned = await checkout.identity(when)
    assert returned.tzinfo == timezone.utc
    assert returned == when


@ensureDeferred
async def test_bytes_and_str_stay_apart(start_server, make_client):
    await start_server()
    client = make_client()
    names = await client.call("types_of", b"b", "s", key=b"k")
    assert names == ["bytes", "str", "key=bytes"]


@ensureDeferred
async def test_args_and_kwargs_pass_whatever_their_names(start_server, make_client):
    """Keyword arguments named like Checkout's own parameters pass through."""
    await start_server()
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        result = await checkout.echo(1, "two", name="n", method="m", self="s")
        via_call = await checkout.call("echo", 3, timeout=4)
    assert result == [[1, "two"], {"name": "n", "method": "m", "self": "s"}]
    assert via_call == [[3], {"timeout": 4}]


@ensureDeferred
async def test_naive_datetime_fails_before_sending(start_server, make_client):
    await start_server()
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        with pytest.raises(TypeError, match="identity"):
            await checkout.identity(datetime(2026, 1, 1))
        assert await checkout.identity(1) == 1


@ensureDeferred
async def test_calls_run_in_order_on_one_worker(start_server, make_client):
    await start_server()
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        calls = [checkout.pid() for _ in range(5)]
        echoes = [checkout.identity(number) for number in range(20)]
        pids = [await call for call in calls]
        results = [await echo for echo in echoes]
    assert len(set(pids)) == 1
    assert results == list(range(20))


@ensureDeferred
async def test_hundred_checkouts_share_five_workers(start_server, make_client):
    """100 checkouts against max_workers=5 are all answered, each its own."""
    await start_server()
    client = make_client(max_workers=5)
    results = []
    pids = set()

    async def one(number: int) -> None:
        with client.checkout(timeout=30) as checkout:
            results.append(await checkout.identity(number))
            pids.add(await checkout.pid())

    await gatherResults([Deferred.fromCoroutine(one(n)) for n in range(100)])
    assert sorted(results) == list(range(100))
    assert 1 <= len(pids) <= 5


@ensureDeferred
async def test_unencodable_return_value_is_remote_error(start_server, make_client):
    """The worker survives: the next call runs on the same pid."""
    await start_server()
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        first = await checkout.pid()
        with pytest.raises(RemoteError) as raised:
            await checkout.unencodable()
        assert raised.value.type_name == "TypeError"
        assert "set" in raised.value.message
        assert await checkout.pid() == first


@ensureDeferred
async def test_remote_error_carries_type_message_traceback(start_server, make_client):
    await start_server()
    client = make_client()
    with pytest.raises(RemoteError) as raised:
        await client.call("fail", "no such user")
    error = raised.value
    assert error.type_name == "ValueError"
    assert error.message == "no such user"
    assert "raise ValueError(message)" in error.remote_traceback
    assert "ValueError: no such user" in str(error)


@pytest.mark.parametrize(
    "method", ["__class__", "__init__", "__globals__", "_private", "getcwd", "CONSTANT"]
)
@ensureDeferred
async def test_private_imported_and_constant_names_refused(
    start_server, make_client, method
):
    await start_server()
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        with pytest.raises(RemoteError, match=method):
            await checkout.call(method)
        assert await checkout.identity("still usable") == "still usable"


@ensureDeferred
async def test_checkout_private_attribute_not_proxied(start_server, make_client):
    await start_server()
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        with pytest.raises(AttributeError):
            checkout._anything  # noqa: B018


@ensureDeferred
async def test_call_after_release_fails(start_server, make_client):
    await start_server()
    client = make_client()
    checkout = client.checkout(timeout=10)
    await checkout.identity(1)
    checkout.release()
    with pytest.raises(CheckoutReleased):
        await checkout.identity(2)


@ensureDeferred
async def test_worker_never_imports_twisted(start_server, make_client):
    await start_server()
    client = make_client()
    assert await client.call("twisted_loaded") == []


@ensureDeferred
async def test_worker_starts_without_logging_socket_or_json(start_server, make_client):
    """Start-up is Python, msgpack and the interface: nothing it may not need."""
    await start_server()
    client = make_client()
    assert await client.call("loaded", "logging", "socket", "json") == []


@pytest.mark.parametrize(
    ("interface", "method", "args", "expected"),
    [
        ("kinds", "exported", [1], ["module", 1]),
        ("kinds:MAPPING", "double", [21], 42),
        ("kinds:INSTANCE", "bump", [], 1),
        ("kinds:Counter", "bump", [], 1),
        ("kinds:dispatcher", "lookup", [1], ["lookup", [1], {}]),
        ("sample", "echo", [1], [[1], {}]),
    ],
)
@ensureDeferred
async def test_interface_kinds_dispatch(
    start_server, make_client, interface, method, args, expected
):
    await start_server(interface)
    client = make_client()
    assert await client.call(method, *args) == expected


@pytest.mark.parametrize(
    ("interface", "expected"),
    [
        ("kinds:direct", ["direct", [5]]),
        ("kinds:Counter", ["called", 5]),
        ("kinds:dispatcher", [5, [], {}]),
    ],
)
@ensureDeferred
async def test_interface_direct_call(start_server, make_client, interface, expected):
    await start_server(interface)
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        assert await checkout(5) == expected


@ensureDeferred
async def test_module_all_limits_methods(start_server, make_client):
    """With __all__, unlisted functions and non-callables are refused."""
    await start_server("kinds")
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        with pytest.raises(RemoteError, match="not_exported"):
            await checkout.not_exported(1)
        with pytest.raises(RemoteError, match="constant"):
            await checkout.constant()


@ensureDeferred
async def test_class_instantiated_once_per_worker(start_server, make_client):
    await start_server("kinds:Counter")
    client = make_client(min_workers=1, max_workers=1)
    for expected in (1, 2, 3):
        assert await client.call("bump") == expected


@ensureDeferred
async def test_fifty_megabytes_round_trip(start_server, make_client):
    """A 50 MB argument reaches the worker and comes back, byte for byte."""
    await start_server()
    client = make_client()
    value = os.urandom(50 * 2**20)
    with client.checkout(timeout=60) as checkout:
        assert await checkout.identity(value) == value
        assert await checkout.echo(value) == [[value], {}]


@ensureDeferred
async def test_tcp_listens_on_loopback_by_default(start_server, make_client):
    server = await start_server(listen="tcp:0")
    address = (await server.listening).getHost()
    assert address.host == "127.0.0.1"
    client = make_client(f"tcp:127.0.0.1:{address.port}")
    assert await client.call("identity", "over tcp") == "over tcp"
