"""
End to end: hostile bytes against a live server, and a hostile worker
against a live client. Whatever a peer sends, that one connection ends with
a named L{ProtocolError} and everything else keeps working.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack
import pytest
from peers import connect_raw
from pytest_twisted import ensureDeferred
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from txtask import ProtocolError, RemoteError, _wire


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def packed(value: Any) -> bytes:
    return frame(msgpack.packb(value))


# What a client may send a worker after its hello, and what the worker's
# ProtocolError says about it.
CLIENT_GARBAGE = {
    "garbage bytes": (frame(b"\xc1\xc1\xc1"), "not msgpack"),
    "oversized frame": (frame(b"\x00" * 8192), "exceeds the limit of 4096"),
    "length claiming gigabytes": (b"\xff\xff\xff\xf0", "4294967280 bytes exceeds"),
    "array claiming gigabytes": (frame(b"\xdd\xff\xff\xff\xff"), "max_array_len"),
    "map claiming gigabytes": (frame(b"\xdf\xff\xff\xff\xff"), "max_map_len"),
    "deep nesting": (frame(b"\x91" * 3000 + b"\xc0"), "nested too deeply"),
    "invalid utf-8": (
        frame(b"\x94\xa4call\xa2\xff\xfe\x90\x80"),
        "can't decode byte 0xff",
    ),
    "not a list": (packed({"call": "echo"}), "expected a message list, got dict"),
    "unknown verb": (packed(["launch", "missiles"]), "unknown message verb 'launch'"),
    "missing fields": (packed(["call", "echo"]), "has 1 fields, expected 3"),
    "wrong field type": (
        packed(["call", "echo", "args", {}]),
        "field 2 of 'call' message is str",
    ),
    "unknown extension": (frame(b"\xd4\x05a"), "unknown msgpack extension type 5"),
    "verb of the other side": (packed(["ok", 1]), "unknown message verb 'ok'"),
}


@pytest.mark.parametrize("case", sorted(CLIENT_GARBAGE))
@ensureDeferred
async def test_worker_ends_only_its_connection_on_garbage(
    start_server, make_client, socket_path, events, case
):
    """
    The worker names the problem in the server's log and exits cleanly; a
    checkout held meanwhile and new checkouts go on working.
    """
    await start_server(max_frame_size=4096)
    client = make_client(min_workers=1)
    bystander = client.checkout(timeout=10)
    assert await bystander.identity("before") == "before"

    peer = await connect_raw(socket_path)
    hello = await peer.first_message.addTimeout(10, reactor)
    pid = hello[2]
    garbage, named = CLIENT_GARBAGE[case]
    peer.transport.write(garbage)
    await peer.closed.addTimeout(10, reactor)

    logged = await events.wait_for(
        lambda event: (
            event.get("pid") == pid and "ProtocolError" in event.get("line", "")
        )
    )
    assert named in logged["line"]
    exited = await events.wait_for(
        lambda event: event.get("pid") == pid and "status" in event
    )
    assert (exited["status"], exited["signal"]) == (0, None)
    assert await bystander.identity("after") == "after"
    bystander.release()
    assert await client.call("identity", "fresh") == "fresh"


@ensureDeferred
async def test_worker_refuses_a_frame_cut_short_by_the_peer(
    start_server, make_client, socket_path, events
):
    await start_server()
    peer = await connect_raw(socket_path)
    [_, _, pid] = await peer.first_message.addTimeout(10, reactor)
    # One whole call first: a peer that hangs up while the worker is still
    # setting up gets it killed rather than heard out.
    answered = Deferred()
    peer.first_message = answered
    peer.transport.write(_wire.call("identity", [1], {}))
    await answered.addTimeout(10, reactor)
    peer.transport.write(frame(b"\x94\xa4call")[:-2])
    peer.transport.loseWriteConnection()
    await peer.closed.addTimeout(10, reactor)

    logged = await events.wait_for(
        lambda event: (
            event.get("pid") == pid and "ProtocolError" in event.get("line", "")
        )
    )
    assert "closed inside a frame" in logged["line"]
    assert await make_client().call("identity", 1) == 1


@ensureDeferred
async def test_server_closes_a_connection_that_speaks_before_its_worker(
    start_server, make_client, socket_path, events
):
    """A client that sends before the hello never reaches a worker."""
    await start_server(max_workers=1)
    blocker = make_client(min_workers=0).checkout(timeout=10)
    await blocker.identity("holding the only worker")

    peer = await connect_raw(socket_path)
    peer.transport.write(b"GET / HTTP/1.0\r\n\r\n")
    await peer.closed.addTimeout(10, reactor)
    assert peer.received == []
    await events.wait_for(lambda event: "before it had a worker" in event["log_format"])
    blocker.release()


class HostileWorker(Protocol):
    """
    Plays a worker: says hello, answers C{good} calls properly, and answers
    C{bad} calls with the bytes the test chose.
    """

    def __init__(self, reply: bytes, greeting: bytes) -> None:
        self.reply = reply
        self.greeting = greeting
        self.decoder = _wire.FrameDecoder()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(_wire.hello(1000) + self.greeting)

    def dataReceived(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            if message[0] != "call":
                continue
            if message[1] == "bad":
                self.transport.write(self.reply)
            else:
                self.transport.write(_wire.ok(message[2]))

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed.callback(None)


async def listen_hostile(path: Any, reply: bytes, first_greeting: bytes = b"") -> list:
    """
    Listen for clients with L{HostileWorker}s; the first one also sends
    C{first_greeting} right behind its hello.

    @return: The workers made so far, then the listening port.
    """
    workers: list[HostileWorker] = []

    def build() -> HostileWorker:
        workers.append(HostileWorker(reply, b"" if workers else first_greeting))
        return workers[-1]

    port = await UNIXServerEndpoint(reactor, str(path)).listen(
        Factory.forProtocol(build)
    )
    workers.append(port)
    return workers


# What a worker may send a client in reply to a call, and what the client's
# ProtocolError says about it.
WORKER_GARBAGE = {
    "garbage bytes": (frame(b"\xc1\xc1"), "not msgpack"),
    "oversized frame": (frame(b"\x00" * 8192), "exceeds the limit of 4096"),
    "length claiming gigabytes": (b"\xff\xff\xff\xf0", "exceeds the limit"),
    "array claiming gigabytes": (frame(b"\xdd\xff\xff\xff\xff"), "max_array_len"),
    "deep nesting": (frame(b"\x91" * 3000 + b"\xc0"), "nested too deeply"),
    "invalid utf-8": (frame(b"\x92\xa2ok\xa2\xff\xfe"), "can't decode byte 0xff"),
    "not a list": (packed("ok"), "expected a message list, got str"),
    "unknown verb": (packed(["maybe", 1]), "unknown message verb 'maybe'"),
    "missing fields": (packed(["error", "remote"]), "has 1 fields, expected 4 to 5"),
    "wrong field type": (
        packed(["error", "remote", 1, "message", "traceback"]),
        "field 2 of 'error' message is int",
    ),
    "malformed event": (packed(["ok", 1, [["log", "yesterday"]]]), "'log' message"),
    "second hello": (_wire.hello(1000), "second hello"),
}


@pytest.mark.parametrize("case", sorted(WORKER_GARBAGE))
@ensureDeferred
async def test_client_fails_the_checkout_on_garbage_from_its_worker(
    make_client, tmp_path, case
):
    """
    The checkout fails with a fatal ProtocolError naming the problem, its
    worker is dropped, and the client's other workers keep serving.
    """
    reply, named = WORKER_GARBAGE[case]
    workers = await listen_hostile(tmp_path / "hostile.sock", reply)
    port = workers.pop()
    client = make_client(
        f"unix:{tmp_path / 'hostile.sock'}", min_workers=2, max_frame_size=4096
    )
    victim = client.checkout(timeout=10)
    bystander = client.checkout(timeout=10)
    assert await victim.good("first") == ["first"]
    assert await bystander.good("first") == ["first"]

    with pytest.raises(ProtocolError, match=named) as raised:
        await victim.bad()
    with pytest.raises(ProtocolError) as again:
        await victim.good("later")
    assert again.value is raised.value
    await DeferredList(
        [worker.closed for worker in workers], fireOnOneCallback=True
    ).addTimeout(10, reactor)
    assert sum(worker.closed.called for worker in workers) == 1

    assert await bystander.good("still") == ["still"]
    bystander.release()
    victim.release()
    assert await client.call("good", "fresh") == ["fresh"]
    await port.stopListening()


@ensureDeferred
async def test_client_refuses_a_reply_sent_before_its_call(make_client, tmp_path):
    """
    A worker that sends a reply right behind its hello, before it could have
    read any call, fails the checkout it was lent to; its replacement serves.
    """
    workers = await listen_hostile(
        tmp_path / "hostile.sock", b"", first_greeting=_wire.ok("unasked")
    )
    port = workers.pop()
    client = make_client(f"unix:{tmp_path / 'hostile.sock'}", min_workers=1)

    with pytest.raises(ProtocolError, match="before the worker could read the call"):
        await client.call("good", "first")
    await workers[0].closed.addTimeout(10, reactor)
    assert await client.call("good", "second") == ["second"]
    await port.stopListening()


@ensureDeferred
async def test_worker_memory_limit_fails_the_call_and_retires_the_worker(
    start_server, make_client
):
    """
    The worker leaves after the checkout whatever the client's
    refork_after_error says; the server goes on serving.
    """
    await start_server(worker_memory_limit=256 * 2**20)
    client = make_client(min_workers=1, refork_after_error=False)
    with client.checkout(timeout=10) as checkout:
        pid = await checkout.pid()
        assert await checkout.allocate(16) == 16 * 2**20
        with pytest.raises(RemoteError) as raised:
            await checkout.allocate(1024)
        assert raised.value.type_name == "MemoryError"
        assert await checkout.pid() == pid
    with client.checkout(timeout=10) as checkout:
        assert await checkout.pid() != pid
        assert await checkout.allocate(16) == 16 * 2**20


def _fuzz_frames(rng: random.Random, count: int) -> list[bytes]:
    """
    Frames of every sort: random bodies, mutated calls, lying lengths, and
    bytes with no frame at all.
    """
    calls = [
        _wire.call("identity", [rng.randbytes(rng.randrange(40))], {}),
        _wire.call("echo", [1, "two", [3.0]], {"key": None}),
        _wire.call(None, [], {}),
        _wire.DONE,
    ]
    made = []
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            made.append(frame(rng.randbytes(rng.randrange(64))))
        elif kind == 1:
            mutated = bytearray(rng.choice(calls))
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            made.append(bytes(mutated))
        elif kind == 2:
            body = rng.choice(calls)[4:]
            made.append(struct.pack(">I", rng.randrange(2**32)) + body)
        elif kind == 3:
            made.append(rng.randbytes(rng.randrange(1, 16)))
        else:
            made.append(rng.choice(calls))
    return made


@ensureDeferred
async def test_server_survives_thousands_of_random_and_mutated_frames(
    start_server, make_client, socket_path
):
    """
    Whatever the frames do to each worker, every hostile connection ends,
    and then a normal checkout works.
    """
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    server = await start_server(max_workers=8, max_frame_size=2**16)
    for _ in range(10):
        peers = [await connect_raw(socket_path) for _ in range(8)]
        for peer in peers:
            await peer.first_message.addTimeout(10, reactor)
            peer.transport.write(b"".join(_fuzz_frames(rng, 40)))
            peer.transport.loseWriteConnection()
        await DeferredList([peer.closed for peer in peers]).addTimeout(10, reactor)

    # A peer sees its connection close only once the server closed its copy,
    # which it does when the worker has exited.
    assert server.live_workers == 0, f"random seed {seed}"
    client = make_client()
    with client.checkout(timeout=10) as checkout:
        assert await checkout.identity(seed) == seed
