"""
End to end: a flood of connections that never send anything.
"""

from __future__ import annotations

import resource

from peers import RawPeer
from processes import children
from pytest_twisted import ensureDeferred
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall

FLOOD = 1000
MAX_WORKERS = 4


@ensureDeferred
async def test_flood_of_silent_connections_stays_under_the_worker_cap(
    start_server, make_client, socket_path, until
):
    """
    A thousand connections at once, none of which ever sends: live workers
    never exceed --max-workers, and once the flood goes away a real client
    is served.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * FLOOD + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    # A backlog deep enough that every connection of the flood gets in.
    server = await start_server(
        listen=f"unix:{socket_path}:backlog={2 * FLOOD}", max_workers=MAX_WORKERS
    )
    counts: list[int] = []
    sampler = LoopingCall(lambda: counts.append(len(children())))
    sampler.start(0.005)

    peers: list[RawPeer] = []

    def build() -> RawPeer:
        peers.append(RawPeer())
        return peers[-1]

    endpoint = UNIXClientEndpoint(reactor, str(socket_path))
    factory = Factory.forProtocol(build)
    await DeferredList(
        [endpoint.connect(factory) for _ in range(FLOOD)], consumeErrors=True
    )
    connected = [peer for peer in peers if peer.transport is not None]
    assert len(connected) > MAX_WORKERS
    await until(
        lambda: sum(peer.first_message.called for peer in connected) == MAX_WORKERS,
        what="the first flood connections' workers to say hello",
    )

    for peer in connected:
        peer.transport.abortConnection()
    await DeferredList([peer.closed for peer in connected]).addTimeout(30, reactor)
    client = make_client(min_workers=1)
    assert await client.checkout(timeout=30).identity("served") == "served"
    sampler.stop()

    assert 0 < max(counts) <= MAX_WORKERS
    assert server.live_workers <= MAX_WORKERS
