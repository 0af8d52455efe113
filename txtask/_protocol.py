"""
The client's side of one worker connection.

L{WorkerConnection} turns frames into events for whoever holds the worker
at the moment: the pool while it is connecting or idle, a checkout while it
is lent out. The holder is a L{WorkerListener}; the connection does not
know about pools or checkouts beyond that.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txtask import _wire
from txtask.errors import ProtocolError


class WorkerListener(TypingProtocol):
    """
    What a holder of a worker connection hears from it.
    """

    def reply_received(self, connection: WorkerConnection, message: list) -> None:
        """
        The worker answered a call (an C{ok} or C{error} message).
        """

    def bye_received(self, connection: WorkerConnection) -> None:
        """
        The worker is leaving and took nothing sent after its last reply.
        """

    def connection_failed(
        self, connection: WorkerConnection, reason: BaseException
    ) -> None:
        """
        The connection is gone or broke the protocol; C{reason} is a
        L{ProtocolError} or the reason the connection was lost.
        """


class WorkerConnection(Protocol):
    """
    One connection to one worker.

    @ivar pid: The worker's process id, once it said hello.
    @ivar ready: Fires with this connection when the worker says hello;
        fails with L{ProtocolError} or the connection loss reason if it
        never does.
    @ivar disconnected: Fires with C{None} when the transport is gone.
    @ivar listener: Who hears replies, C{bye} and loss from now on.
    @ivar checkouts: Checkouts this worker has served.
    @ivar endpoint_label: Which endpoint it came from, for logs.
    """

    log = Logger()

    def __init__(self, max_frame_size: int, endpoint_label: str) -> None:
        self.pid: int | None = None
        self.ready: Deferred[WorkerConnection] = Deferred()
        self.disconnected: Deferred[None] = Deferred()
        self.listener: WorkerListener | None = None
        self.checkouts = 0
        self.endpoint_label = endpoint_label
        self._decoder = _wire.FrameDecoder(max_frame_size)
        self._failed = False
        # Which chunk of received data was being handled when the latest
        # frame was sent. A reply in that same chunk was on its way before
        # the worker could read the frame, so it answers nothing.
        self._chunk = 0
        self._sent_in_chunk = -1

    def send(self, frame: bytes) -> None:
        """
        Send an encoded frame to the worker.
        """
        self._sent_in_chunk = self._chunk
        self.transport.write(frame)

    def close(self) -> None:
        """
        Drop the connection; the listener hears nothing more.
        """
        self.listener = None
        self._fail(ConnectionDone("closed by the client"))
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self._chunk += 1
        try:
            for message in self._decoder.feed(data):
                self._dispatch(_wire.check_worker_message(message))
                if self._failed:
                    return
        except ProtocolError as error:
            self.log.warn(
                "malformed data from worker {pid} at {endpoint}, dropping the "
                "connection: {error}",
                pid=self.pid,
                endpoint=self.endpoint_label,
                error=str(error),
            )
            self._fail(error)
            self.transport.abortConnection()

    def _dispatch(self, message: list) -> None:
        verb = message[0]
        # A reply, the common case, first; a listener implies the hello.
        listener = self.listener
        if (verb == "ok" or verb == "error") and listener is not None:
            if self._sent_in_chunk == self._chunk:
                raise ProtocolError(
                    f"{verb!r} message sent before the worker could read the call"
                )
            listener.reply_received(self, message)
        elif self.pid is None:
            if verb != "hello":
                raise ProtocolError(f"expected hello from the worker, got {verb!r}")
            if message[1] != _wire.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"worker speaks protocol version {message[1]}, this client "
                    f"speaks {_wire.PROTOCOL_VERSION}; install the same txtask "
                    f"version on both sides"
                )
            self.pid = message[2]
            self.ready.callback(self)
        elif verb == "hello":
            raise ProtocolError("second hello from the worker")
        elif verb == "bye":
            listener, self.listener = self.listener, None
            self._failed = True
            self.transport.loseConnection()
            if listener is not None:
                listener.bye_received(self)
        else:
            raise ProtocolError(f"{verb!r} message while no call was running")

    def connectionLost(self, reason: Failure = None) -> None:
        self._fail(reason.value)
        self.disconnected.callback(None)

    def _fail(self, reason: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        if self.pid is None:
            # Before the transport exists nobody waits on ready: the pool
            # cancels the connection attempt instead.
            if self.transport is not None:
                self.ready.errback(Failure(reason))
            return
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.connection_failed(self, reason)
