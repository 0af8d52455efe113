"""
End to end: workers killed at random under load; every call still ends
exactly once, with its own value or WorkerDied.
"""

from __future__ import annotations

import os
import random
import signal

from pytest_twisted import ensureDeferred
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall

from txtask import WorkerDied


@ensureDeferred
async def test_chaos_every_call_ends_once(start_server, make_client, until):
    server = await start_server()
    client = make_client(min_workers=4, max_workers=4, timeout=60)
    chooser = random.Random(os.getpid())

    killed: list[int] = []

    def kill_one() -> None:
        pids = [worker.pid for worker in server._workers if worker.pid]
        if pids:
            pid = chooser.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            killed.append(pid)

    fired: dict[int, list] = {}

    def record(result, number: int):
        fired.setdefault(number, []).append(result)

    # Each call takes a millisecond in the worker, so the 2,000 calls span
    # about half a second and many kills land in the middle of one.
    killer = LoopingCall(kill_one)
    killer.clock = reactor
    killer.start(0.02, now=False)
    calls: list[Deferred] = []
    for number in range(2000):
        call = client.call("slow_identity", number, 0.001)
        call.addBoth(record, number)
        calls.append(call)
    await DeferredList(calls)
    killer.stop()

    assert sorted(fired) == list(range(2000))
    successes = died = 0
    for number, results in fired.items():
        assert len(results) == 1
        [result] = results
        if isinstance(result, int):
            assert result == number
            successes += 1
        else:
            assert result.check(WorkerDied), result
            died += 1
    assert successes > 0
    assert len(killed) >= 5
    assert died > 0
    # Every failed call lost its worker; idle workers killed count too.
    assert client.stats()["workers_retired"]["death"] >= died

    await until(
        lambda: client.stats()["idle"] == 4, what=f"pool refilled: {client.stats()}"
    )
    assert await client.call("identity", "after") == "after"
