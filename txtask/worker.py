"""
The worker: a blocking loop that serves one client connection for life.

The server starts it with L{main} (its settings as one argument) with the
client's connection on file descriptor 3 and a control pipe on standard
input.
It says hello (its pid and the protocol version), then answers calls one at
a time. A checkout is the run of calls up to a C{done} message, after which
the C{checkout_done} hook runs.

Between checkouts the worker also watches the control pipe: when the
server closes it (a graceful stop, or the server went away), the worker
sends C{bye} and exits without taking the call that may be waiting, so the
client can move that checkout to another worker. Inside a checkout it
finishes the checkout first.

Records of the standard C{logging} module emitted while a request runs,
and the timers of L{timer}, go back to the client with the reply; outside
requests, records go to standard error, which the server logs.

This module never imports Twisted or the client: each worker pays only for
Python, msgpack and the interface. It does not import C{logging} or
C{socket} either; the capture of records starts when C{logging} is first
imported, by the interface or anything else.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import sys
import time
from collections import deque

import msgpack

from txtask import _wire
from txtask._dispatch import Dispatcher, resolve
from txtask.errors import ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import importlib.machinery
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any, Protocol

    class Connection(Protocol):
        """
        What the worker needs of its connection: a socket, or L{_Descriptor}.
        """

        def fileno(self) -> int: ...
        def recv(self, size: int) -> bytes: ...
        def sendall(self, data: bytes) -> None: ...


#: What C{python -c} runs to start a worker. Importing this module by its
#: name (not running it with C{-m}) keeps one copy of it, shared with the
#: interface code that imports it for L{timer}.
ENTRY = "from txtask.worker import main; main()"

#: The client connection's file descriptor in a worker process.
CONNECTION_FD = 3
#: The status page shared with the server, when there is one.
STATUS_FD = 4
#: The status page's call counter: odd while a call runs.
STATUS_COUNTER = struct.Struct("=Q")

# Below glibc's mmap threshold (128 KiB), so that each recv() takes its
# buffer from the heap rather than mapping and unmapping fresh pages.
_RECEIVE_SIZE = 64 * 1024

#: The logger of the worker's own records, which go to standard error.
LOGGER_NAME = "txtask.worker"


class _Recording:
    """
    Where the events of the running request go.

    @ivar events: The events of the running request, or C{None} between
        requests.
    @ivar kept: While setup runs, its log records as events: they go to
        standard error and, should setup fail, to the callers too.
    """

    def __init__(self) -> None:
        self.events: list | None = None
        self.kept: list | None = None


_recording = _Recording()


class _Timer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.start = 0.0

    def __enter__(self) -> _Timer:
        self.start = time.time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        events = _recording.events
        if events is not None:
            events.append(["timer", self.name, self.start, time.time()])


def timer(name: str) -> _Timer:
    """
    Time a step of the running request: C{with txtask.worker.timer("sql"):}.

    The timer travels back with the reply and lands in the checkout's
    C{RequestLog}. Outside a request it records nothing.
    """
    return _Timer(str(name))


class Worker:
    """
    Serve calls from one connection until it closes or the server says stop.

    @ivar calls: Number of calls answered.
    @ivar retiring: Whether the worker leaves at the end of this checkout
        (a call ran out of memory).
    """

    def __init__(
        self,
        connection: Connection,
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
        self._setup_failure: tuple[str, str, str, list] | None = None
        self._checkout_done: Callable[[], Any] | None = None
        self._title: Callable[[str], None] | None = None
        self.calls = 0
        self.retiring = False

    def show_title(self, title: Callable[[str], None]) -> None:
        """
        Keep the process title up to date: C{title} gets C{"idle"} or
        C{"busy: METHOD"}.
        """
        self._title = title
        title("idle")

    def run(self) -> None:
        """
        Serve until the connection closes, the server asks to stop, or the
        peer breaks the protocol.
        """
        try:
            self._connection.sendall(_wire.hello(os.getpid()))
        except ConnectionError:
            # The client left before the worker was ready: nobody to serve.
            return
        # Set up while the client sends its first call: outside any request,
        # so a standby worker is ready before anyone checks it out.
        self._mark_status()
        self._setup_failure = self._set_up()
        self._mark_status()
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
                    reply = self._call(message[1], message[2], message[3])
                    self._mark_status()
                    self._connection.sendall(reply)
                else:
                    in_checkout = False
                    if not self._run_checkout_done() or self.retiring:
                        self._connection.sendall(_wire.BYE)
                        return
        except ProtocolError as error:
            _log_error("closing the connection: %s: %s", type(error).__name__, error)
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
        received = self._received
        while not received:
            data = self._connection.recv(_RECEIVE_SIZE)
            if not data:
                if self._decoder.pending:
                    raise ProtocolError(
                        f"connection closed inside a frame, "
                        f"{self._decoder.pending} bytes short"
                    )
                return None
            messages = self._decoder.feed(data)
            if len(messages) == 1:
                return _wire.check_client_message(messages[0])
            received.extend(map(_wire.check_client_message, messages))
        return received.popleft()

    def _call(self, method: str | None, args: list, kwargs: dict) -> bytes:
        """
        Run one call and return the reply frame, with the events the call
        (and setup, on the first call) produced.
        """
        self.calls += 1
        if self._title is not None:
            self._title(f"busy: {method or '__call__'}")
        events: list = []
        _recording.events = events
        try:
            return self._run(method, args, kwargs, events)
        finally:
            _recording.events = None
            if self._title is not None:
                self._title("idle")

    def _run(self, method: str | None, args: list, kwargs: dict, events: list) -> bytes:
        if self._setup_failure is not None:
            *error, kept = self._setup_failure
            return _wire.error("setup", *error, kept + events)
        assert self._dispatcher is not None

        try:
            value = self._dispatcher.lookup(method)(*args, **kwargs)
        except MemoryError as error:
            # Memory this short leaves the worker in no state to trust: it
            # answers, then leaves once the checkout ends.
            self.retiring = True
            return _wire.error("remote", *_describe(error), events)
        except Exception as error:
            return _wire.error("remote", *_describe(error), events)
        try:
            return _wire.ok(value, events)
        except TypeError as error:
            name = "the interface" if method is None else f"{method}()"
            return _wire.error(
                "remote",
                "TypeError",
                f"the return value of {name}, of type {type(value).__name__}, "
                f"cannot be sent back: {error}",
                "",
                events,
            )

    def _set_up(self) -> tuple[str, str, str, list] | None:
        """
        Import the interface and hooks, and run setup: once per worker.

        @return: C{None}, or the error every call will get, with the records
            logged meanwhile.
        """
        kept: list = []
        _recording.kept = kept
        try:
            if self._setup_path is not None:
                resolve(self._setup_path)()
            if self._checkout_done_path is not None:
                self._checkout_done = resolve(self._checkout_done_path)
            self._dispatcher = Dispatcher.build(resolve(self._interface_path))
        except Exception as error:
            _log_error("worker setup failed: %s: %s", type(error).__name__, error)
            return (*_describe(error), kept)
        finally:
            _recording.kept = None
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
            _log_error("checkout_done failed; this worker will exit", exc_info=True)
            return False
        return True


def _describe(error: Exception) -> tuple[str, str, str]:
    """
    The type name, message and traceback of the exception being handled.
    """
    import traceback

    return type(error).__name__, str(error), traceback.format_exc()


def _title_setter(name: str | None, number: int) -> Callable[[str], None] | None:
    if name is None:
        return None
    try:
        import setproctitle
    except ImportError:
        return None
    prefix = f"txtask-worker: {name} ({number})"
    return lambda state: setproctitle.setproctitle(f"{prefix} {state}")


class _Descriptor:
    """
    The client connection as a bare file descriptor: the few socket methods
    the worker uses, without importing the C{socket} module.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def recv(self, size: int) -> bytes:
        return os.read(self._fd, size)

    def sendall(self, data: bytes) -> None:
        with memoryview(data) as view:
            while view:
                view = view[os.write(self._fd, view) :]


def _log_error(message: str, *args: object, exc_info: bool = False) -> None:
    """
    Log one of the worker's own errors, which go to standard error.
    """
    import logging

    logging.getLogger(LOGGER_NAME).error(message, *args, exc_info=exc_info)


def _capture_logging(level: str) -> None:
    """
    Capture log records once the C{logging} module is imported, by anyone.

    Importing C{logging} costs a worker several milliseconds of start-up,
    and many interfaces never use it; until one does, there is nothing to
    capture.
    """
    if "logging" in sys.modules:
        _start_capture(sys.modules["logging"], level)
    else:
        sys.meta_path.insert(0, _LoggingImport(level))


def _start_capture(logging: ModuleType, level: str) -> None:
    from txtask._worklog import Capture

    root = logging.getLogger()
    root.addHandler(Capture(_recording, level, LOGGER_NAME))
    root.setLevel(level)


class _LoggingImport:
    """
    An import hook that starts the capture as soon as C{logging} has been
    imported, before the importer gets the module, and then leaves.
    """

    def __init__(self, level: str) -> None:
        self._level = level

    def find_spec(
        self, name: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "logging":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module
        level = self._level

        def exec_module(module: ModuleType) -> None:
            load(module)
            _start_capture(module, level)

        # The loader is this spec's own instance.
        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def encode_settings(settings: dict[str, Any]) -> str:
    """
    The worker's settings as its one command-line argument.
    """
    return msgpack.packb(settings).hex()


def decode_settings(argument: str) -> dict[str, Any]:
    """
    The settings L{encode_settings} wrote.
    """
    return msgpack.unpackb(bytes.fromhex(argument))


def main(argv: list[str] | None = None) -> None:
    """
    Entry point of a worker process; the server passes its settings as one
    argument written by L{encode_settings}.
    """
    config = decode_settings((argv if argv is not None else sys.argv)[1])

    # A session of its own lets the server kill the worker together with
    # any process it started.
    os.setsid()
    memory_limit = config.get("memory_limit")
    if memory_limit is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    _capture_logging(config.get("log_level", "INFO"))

    # The descriptor shares its open file with the server's copy, which
    # Twisted made non-blocking; this loop wants to block.
    os.set_blocking(CONNECTION_FD, True)
    connection = _Descriptor(CONNECTION_FD)
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
    title = _title_setter(config.get("name"), config.get("number", 0))
    if title is not None:
        worker.show_title(title)
    worker.run()
