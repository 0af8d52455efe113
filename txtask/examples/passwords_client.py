"""
Example client: hash a password in a worker, then verify it.

With a server of L{txtask.examples.passwords} running::

    python -m txtask.examples.passwords_client unix:txtask.sock
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks

from txtask import Client


@inlineCallbacks
def run(
    client: Client, say: Callable[[str], None] = print
) -> Generator[Any, Any, None]:
    """
    Hash C{"secret"} and verify it, each call on its own checkout.
    """
    crypted = yield client.call("hash", "secret")
    say(f"Hashed password is {crypted}")

    with client.checkout(timeout=10) as checkout:
        matches = yield checkout.verify(crypted, "secret")
    say(f"Verify result is {matches}")


def main(reactor: Any, connect: str = "unix:txtask.sock") -> Deferred[None]:
    client = Client(connect, min_workers=1)
    finished = run(client)
    finished.addBoth(lambda result: client.close().addCallback(lambda _: result))
    return finished


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
