"""
Example client: a database session spanning several calls on one checkout.

With a server of L{txtask.examples.dbi} running::

    python -m txtask.examples.dbi_client unix:txtask.sock
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from txtask import Client


async def run(client: Client, say: Callable[[str], None] = print) -> None:
    """
    Create a table, insert a user and read it back, in one transaction on
    one worker.
    """
    async with client.checkout(timeout=10) as db:
        await db.do(
            "CREATE TABLE IF NOT EXISTS user (username TEXT PRIMARY KEY, email TEXT)"
        )
        await db.do(
            "INSERT OR REPLACE INTO user VALUES (?, ?)", "jimmy", "jimmy@example.com"
        )
        user = await db.selectrow("SELECT * FROM user WHERE username = ?", "jimmy")
        await db.commit()
    say(f"username: {user['username']}, email: {user['email']}")


def main(reactor: Any, connect: str = "unix:txtask.sock") -> Deferred[None]:
    client = Client(connect, min_workers=1)
    finished = Deferred.fromCoroutine(run(client))
    finished.addBoth(lambda result: client.close().addCallback(lambda _: result))
    return finished


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
