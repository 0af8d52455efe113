"""
Run both examples end to end: C{python -m txtask.demo}.

For each example it starts a server on a unix socket in a temporary
directory, runs the example's client against it, and stops the server.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred

from txtask import Client, TaskServer
from txtask.examples import dbi_client, passwords_client

_ClientRun = Callable[[Client], Any]


async def _run_example(reactor: Any, server: TaskServer, run: _ClientRun) -> None:
    server.startService()
    await server.listening
    client = Client(server.listen, min_workers=1, reactor=reactor)
    try:
        await run(client)
    finally:
        await client.close()
        await server.stopService()


async def _demo(reactor: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="txtask-demo-") as directory:
        os.environ["TXTASK_EXAMPLE_DB"] = os.path.join(directory, "example.db")
        passwords = TaskServer(
            "txtask.examples.passwords",
            listen=f"unix:{directory}/passwords.sock",
            name="demo-passwords",
            reactor=reactor,
        )
        await _run_example(reactor, passwords, passwords_client.run)
        database = TaskServer(
            "txtask.examples.dbi",
            listen=f"unix:{directory}/dbi.sock",
            setup="txtask.examples.dbi:setup",
            checkout_done="txtask.examples.dbi:rollback",
            name="demo-dbi",
            reactor=reactor,
        )
        await _run_example(reactor, database, dbi_client.run)


def main(reactor: Any) -> Deferred[None]:
    return ensureDeferred(_demo(reactor))


if __name__ == "__main__":
    task.react(main)
