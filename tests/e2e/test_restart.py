"""
End to end: a server restarted under a steady load loses and fails nothing.
"""

from __future__ import annotations

from pytest_twisted import ensureDeferred
from twisted.internet.defer import Deferred, gatherResults


@ensureDeferred
async def test_restart_under_load_loses_no_call(twistd, make_client):
    old = await twistd("--interface", "sample")
    client = make_client(min_workers=2, max_workers=4, timeout=30)
    sent: list[int] = []
    answered: list[int] = []
    failed: list[BaseException] = []
    enough: list[tuple[int, Deferred[None]]] = []
    running = True

    def answer(value: int) -> None:
        answered.append(value)
        for waiting in list(enough):
            if len(answered) >= waiting[0]:
                enough.remove(waiting)
                waiting[1].callback(None)

    def answers(count: int) -> Deferred[None]:
        reached: Deferred[None] = Deferred()
        enough.append((count, reached))
        answer_count = len(answered)
        if answer_count >= count:
            enough.remove((count, reached))
            reached.callback(None)
        return reached

    async def load(lane: int) -> None:
        number = lane * 1_000_000
        while running:
            number += 1
            sent.append(number)
            try:
                # Two calls per checkout, so some checkouts span the stop.
                with client.checkout() as checkout:
                    assert await checkout.identity(number) == number
                    await checkout.pid()
            except Exception as error:
                failed.append(error)
            else:
                answer(number)

    lanes = gatherResults([Deferred.fromCoroutine(load(lane)) for lane in range(4)])
    await answers(100)
    old.transport.signalProcess("TERM")
    await old.logged(b"no longer listening")
    await twistd("--interface", "sample")
    await answers(len(answered) + 200)
    running = False
    await lanes
    await old.ended

    assert failed == []
    assert sorted(answered) == sorted(sent)
