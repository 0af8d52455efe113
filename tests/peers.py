"""
A raw connection to a txtask server: the hostile side of the conversation.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from txtask import _wire


class RawPeer(Protocol):
    """
    A connection that sends whatever the test says and records what comes
    back: the hostile side of the conversation.
    """

    def __init__(self) -> None:
        self.decoder = _wire.FrameDecoder()
        self.received: list[Any] = []
        self.first_message: Deferred[Any] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            self.received.append(message)
            if not self.first_message.called:
                self.first_message.callback(message)

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed.callback(None)


async def connect_raw(path: Any) -> RawPeer:
    peer = RawPeer()
    endpoint = UNIXClientEndpoint(reactor, str(path))
    await endpoint.connect(Factory.forProtocol(lambda: peer))
    return peer
