"""
The worker: a blocking loop that serves one client connection for life.

The server starts it as C{python -m txtask.worker CONFIG} with the client's
connection on file descriptor 3 and a control pipe on standard input.
It says hello (its pid and the protocol version), then answers calls one at
a time. A checkout is the run of calls up to a C{done} message, after which
the C{checkout_done} hook runs.

Between checkouts the worker also watches the control pipe: when the
server closes it (a graceful stop, or the server went away), the worker
sends C{bye} and exits without taking the call that may be waiting, so the
client can move that checkout to another worker. Inside a checkout it
finishes the checkout first.

This module never imports Twisted or the client: each worker pays only for
Python, msgpack and the interface.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import select
import socket
import struct
import sys
import traceback
from collections import deque
from collections.abc import Callable

from txtask import _wire
from txtask._dispatch import Dispatcher, resolve
from txtask.errors import ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: The client connection's file descriptor in a worker process.
CONNECTION_FD = 3
#: The status page shared with the server, when there is one.
STATUS_FD = 4
#: The status page's call counter: odd while a call runs.
STATUS_COUNTER = struct.Struct("=Q")

# Below glibc's mmap threshold (128 KiB), so that each recv() takes its
# buffer from the heap rather than mapping and unmapping fresh pages.
_RECEIVE_SIZE = 64 * 1024

log = logging.getLogger("txtask.worker")


class Worker:
    """
    Serve calls from one connection until it closes or the server says stop.

    @ivar calls: Number of calls answered.
    """

    def __init__(
        self,
        connection: socket.socket,
        control_fd: int,
        interface: str,
        setup: str | None = None,
        checkout_done: str | None = None,
        max_frame_size: int = _wire.DEFAULT_MAX_FRAME_SIZE,
        status: mmap.mmap | None = None,
    ) -> None:
        """
        @param status: The status page the server watches for hung calls.
        """
        self._connection = connection
        self._status = status
        self._status_count = 0
        self._control_fd = control_fd
        self._interface_path = interface
        self._setup_path = setup
        self._checkout_done_path = checkout_done
        self._decoder = _wire.FrameDecoder(max_frame_size)
        self._received: deque[list] = deque()
        self._dispatcher: Dispatcher | None = None
        self._setup_failure: bytes | None = None
        self._checkout_done: Callable[[], Any] | None = None
        self.calls = 0

    def run(self) -> None:
        """
        Serve until the connection closes, the server asks to stop, or the
        peer breaks the protocol.
        """
        self._connection.sendall(_wire.hello(os.getpid()))
        in_checkout = False
        try:
            while True:
                if not in_checkout and self._stop_requested():
                    self._connection.sendall(_wire.BYE)
                    return
                message = self._receive()
                if message is None:
                    return
                if message[0] == "call":
                    in_checkout = True
                    self._mark_status()
                    reply = self._call(*message[1:])
                    self._mark_status()
                    self._connection.sendall(reply)
                else:
                    in_checkout = False
                    if not self._run_checkout_done():
                        self._connection.sendall(_wire.BYE)
                        return
        except ProtocolError as error:
            log.error("closing the connection: %s: %s", type(error).__name__, error)
        except (ConnectionError, BrokenPipeError):
            return

    def _mark_status(self) -> None:
        # Odd while a call runs: the server kills a worker whose counter
        # stays odd for longer than its hung worker timeout.
        if self._status is not None:
            self._status_count += 1
            STATUS_COUNTER.pack_into(self._status, 0, self._status_count)

    def _stop_requested(self) -> bool:
        # Block until the client sends something or the control pipe closes;
        # a call already buffered only needs a look at the pipe.
        waiting = [self._connection, self._control_fd]
        timeout = 0 if self._received else None
        readable, _, _ = select.select(waiting, [], [], timeout)
        if self._control_fd not in readable:
            return False
        return not os.read(self._control_fd, 4096)

    def _receive(self) -> list | None:
        while not self._received:
            data = self._connection.recv(_RECEIVE_SIZE)
            if not data:
                if self._decoder.pending:
                    raise ProtocolError(
                        f"connection closed inside a frame, "
                        f"{self._decoder.pending} bytes short"
                    )
                return None
            for message in self._decoder.feed(data):
                self._received.append(
                    _wire.check_message(message, _wire.CLIENT_MESSAGES)
                )
        return self._received.popleft()

    def _call(self, method: str | None, args: list, kwargs: dict) -> bytes:
        """
        Run one call and return the reply frame.
        """
        self.calls += 1
        if self._dispatcher is None and self._setup_failure is None:
            self._setup_failure = self._set_up()
        if self._setup_failure is not None:
            return self._setup_failure
        assert self._dispatcher is not None

        try:
            value = self._dispatcher.lookup(method)(*args, **kwargs)
        except Exception as error:
            return _error_reply("remote", error)
        try:
            return _wire.ok(value)
        except TypeError as error:
            name = "the interface" if method is None else f"{method}()"
            return _wire.error(
                "remote",
                "TypeError",
                f"the return value of {name}, of type {type(value).__name__}, "
                f"cannot be sent back: {error}",
                "",
            )

    def _set_up(self) -> bytes | None:
        """
        Import the interface and hooks, and run setup: once per worker.

        @return: C{None}, or the setup error reply every call will get.
        """
        try:
            if self._setup_path is not None:
                resolve(self._setup_path)()
            if self._checkout_done_path is not None:
                self._checkout_done = resolve(self._checkout_done_path)
            self._dispatcher = Dispatcher.build(resolve(self._interface_path))
        except Exception as error:
            log.error("worker setup failed: %s: %s", type(error).__name__, error)
            return _error_reply("setup", error)
        return None

    def _run_checkout_done(self) -> bool:
        """
        Run the checkout_done hook after a checkout that reached the
        interface.

        @return: Whether the worker may serve another checkout.
        """
        if self._checkout_done is None:
            return True
        try:
            self._checkout_done()
        except Exception:
            log.exception("checkout_done failed; this worker will exit")
            return False
        return True


def _error_reply(kind: str, error: Exception) -> bytes:
    return _wire.error(kind, type(error).__name__, str(error), traceback.format_exc())


def _set_title(name: str | None, number: int) -> None:
    if name is None:
        return
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(f"txtask-worker: {name} ({number})")


def main(argv: list[str] | None = None) -> None:
    """
    Entry point of a worker process; the server passes its settings as one
    JSON argument.
    """
    config = json.loads((argv if argv is not None else sys.argv)[1])

    # A session of its own lets the server kill the worker together with
    # any process it started.
    os.setsid()
    logging.basicConfig(
        stream=sys.stderr,
        level=config.get("log_level", "INFO"),
        format="%(levelname)s %(name)s: %(message)s",
    )
    _set_title(config.get("name"), config.get("number", 0))

    # The descriptor shares its open file with the server's copy, which
    # Twisted made non-blocking; this loop wants to block.
    connection = socket.socket(fileno=CONNECTION_FD)
    connection.setblocking(True)
    try:
        # The map holds its own duplicate of the descriptor.
        status = mmap.mmap(STATUS_FD, STATUS_COUNTER.size)
    except OSError:
        status = None
    else:
        os.close(STATUS_FD)
    worker = Worker(
        connection,
        control_fd=sys.stdin.fileno(),
        interface=config["interface"],
        setup=config.get("setup"),
        checkout_done=config.get("checkout_done"),
        max_frame_size=config.get("max_frame_size", _wire.DEFAULT_MAX_FRAME_SIZE),
        status=status,
    )
    worker.run()


if __name__ == "__main__":
    main()
