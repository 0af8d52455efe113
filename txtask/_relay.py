"""
Relaying a client connection the server cannot hand over, such as TLS.

A plain socket goes to its worker as a file descriptor, and the server
never touches it again. A TLS connection cannot: its encryption state lives
in this process. For those the worker gets one end of a fresh socket pair
instead, and L{Relay} carries bytes between the client's transport and the
other end, with flow control both ways. Every call then crosses this
process, which costs it the direct path's speed; TLS connections pay that
for their encryption.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import ISSLTransport, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

_DRAIN_SIZE = 64 * 1024


def needs_relay(transport: ITransport) -> bool:
    """
    Whether a client connection must stay in the server: it is encrypted
    here, so its socket carries no plain frames a worker could read.
    """
    return ISSLTransport.providedBy(transport)


class Relay(Protocol):
    """
    The server's end of the socket pair between a client connection and its
    worker.

    @ivar worker_fd: The worker's end, for it to inherit; closed here once
        the worker has started.
    """

    def __init__(self, client: ITransport) -> None:
        self._client = client
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.worker_fd = self._theirs.fileno()
        self._lost = False

    def start(self, reactor: Any) -> None:
        """
        Start relaying once the worker holds its end.
        """
        self._theirs.close()
        reactor.adoptStreamConnection(
            self._ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: self)
        )
        # The reactor took its own duplicate of the descriptor.
        self._ours.close()

    def abandon(self) -> None:
        """
        The worker never started: close both ends.
        """
        self._theirs.close()
        self._ours.close()

    def connectionMade(self) -> None:
        # Each side stops reading while the other cannot take more.
        self._client.registerProducer(self.transport, True)
        self.transport.registerProducer(self._client, True)

    def to_worker(self, data: bytes) -> None:
        """
        Pass bytes from the client on to the worker.
        """
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self._client.write(data)

    def close(self) -> None:
        """
        The client is gone: close this end, so the worker reads the end of
        its stream.
        """
        if self.transport is not None:
            self.transport.loseConnection()

    def finish(self) -> None:
        """
        The worker exited: pass on what it wrote last, then close.

        Its last bytes (a reply, a C{bye}) may still wait in the pair when
        the exit is heard, and closing stops reading at once.
        """
        if self.transport is None or self._lost:
            return
        handle = self.transport.getHandle()
        while True:
            try:
                data = handle.recv(_DRAIN_SIZE)
            except (BlockingIOError, ConnectionError):
                break
            if not data:
                break
            self._client.write(data)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self._lost = True
        self._client.unregisterProducer()
