"""
End to end: recycling workers leaks no descriptor and leaves no zombie.
"""

from __future__ import annotations

import os

from processes import children
from pytest_twisted import ensureDeferred
from twisted.internet.defer import Deferred, gatherResults

RECYCLES = 1000


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@ensureDeferred
async def test_workers_inherit_only_their_descriptors(start_server, make_client):
    """Not the listening socket: only stdio, the connection, the status page."""
    await start_server()
    client = make_client()
    fds = await client.call("open_fds")
    kinds = sorted(target.split(":")[0] for target in fds.values())
    assert kinds == ["/memfd", "pipe", "pipe", "pipe", "socket"], fds
    assert fds[3].startswith("socket:"), fds


@ensureDeferred
async def test_thousand_recycles_leak_nothing(start_server, make_client, until):
    """
    Server and client share this process, so its descriptors and children
    cover both sides.
    """
    await start_server()
    client = make_client(min_workers=2, max_workers=2, max_checkouts=1)

    def settled() -> bool:
        return client.stats()["idle"] == 2 and len(children()) == 2

    await client.call("pid")
    await until(settled, what="two idle workers")
    fds_before = _open_fds()

    pids: set[int] = set()

    async def lane(count: int) -> None:
        for _ in range(count):
            pids.add(await client.call("pid"))

    await gatherResults([Deferred.fromCoroutine(lane(RECYCLES // 2)) for _ in range(2)])
    await until(settled, what="two idle workers again")

    assert len(pids) == RECYCLES
    assert _open_fds() == fds_before
    assert [state for _, state in children() if state == "Z"] == []
