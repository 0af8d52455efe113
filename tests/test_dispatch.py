"""
Tests for the worker side of a call: L{txtask._dispatch} finds the callable,
L{txtask.worker.Worker} runs the blocking loop around it.

The worker tests run L{Worker.run} in the test's own thread on a
C{socketpair}: the test writes every frame the client would send, shuts its
side for writing, runs the loop until it sees the end of input, then reads
what the worker answered.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import decode_frames, make_module

from txtask import _wire
from txtask._dispatch import Dispatcher, resolve
from txtask.worker import STATUS_COUNTER, Worker, _Descriptor

# Dispatcher: modules


@pytest.fixture
def hasher(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """
    A module without __all__ that defines hash() and imports a function.
    """
    return make_module(
        monkeypatch,
        "txtask_test_hasher",
        """
        from os.path import join

        SALT = "pepper"

        def hash(password, rounds=1):
            return f"{password}:{rounds}"

        def _secret():
            return "private"

        class Helper:
            pass
        """,
    )


def test_dispatcher_module_calls_its_own_function(hasher: types.ModuleType) -> None:
    assert Dispatcher(hasher).lookup("hash")("pw", rounds=3) == "pw:3"


def test_dispatcher_module_refuses_an_imported_function(
    hasher: types.ModuleType,
) -> None:
    """A module's `from os.path import join` is not callable by clients."""
    with pytest.raises(AttributeError, match="'join'"):
        Dispatcher(hasher).lookup("join")


def test_dispatcher_module_refuses_a_class_it_defines(
    hasher: types.ModuleType,
) -> None:
    with pytest.raises(AttributeError, match="'Helper'"):
        Dispatcher(hasher).lookup("Helper")


def test_dispatcher_module_refuses_a_constant(hasher: types.ModuleType) -> None:
    with pytest.raises(AttributeError, match="'SALT'"):
        Dispatcher(hasher).lookup("SALT")


def test_dispatcher_module_refuses_a_missing_method(hasher: types.ModuleType) -> None:
    with pytest.raises(AttributeError, match="no method 'crack'"):
        Dispatcher(hasher).lookup("crack")


def test_dispatcher_module_sees_a_rebound_name(hasher: types.ModuleType) -> None:
    """A name rebound after its first call is checked afresh, not remembered."""
    dispatcher = Dispatcher(hasher)
    assert dispatcher.lookup("hash")("pw") == "pw:1"

    hasher.hash = os.path.join
    with pytest.raises(AttributeError, match="no method 'hash'"):
        dispatcher.lookup("hash")
    del hasher.hash
    with pytest.raises(AttributeError, match="no method 'hash'"):
        dispatcher.lookup("hash")


def test_dispatcher_module_with_all_calls_only_listed_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = make_module(
        monkeypatch,
        "txtask_test_exported",
        """
        from os.path import basename
        __all__ = ["basename", "listed"]

        def listed():
            return "listed"

        def unlisted():
            return "unlisted"
        """,
    )
    dispatcher = Dispatcher(module)
    assert dispatcher.lookup("listed")() == "listed"
    assert dispatcher.lookup("basename")("/a/b") == "b"
    with pytest.raises(AttributeError, match="'unlisted'"):
        dispatcher.lookup("unlisted")


def test_dispatcher_module_with_all_refuses_a_listed_name_it_lacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = make_module(monkeypatch, "txtask_test_broken_all", '__all__ = ["gone"]')
    with pytest.raises(AttributeError, match="'gone'"):
        Dispatcher(module).lookup("gone")


def test_dispatcher_module_with_all_refuses_a_listed_non_callable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = make_module(
        monkeypatch, "txtask_test_constant_all", '__all__ = ["LIMIT"]\nLIMIT = 3'
    )
    with pytest.raises(AttributeError, match="not callable"):
        Dispatcher(module).lookup("LIMIT")


@pytest.mark.parametrize("method", ["_secret", "__init__", "__class__", ""])
def test_dispatcher_refuses_private_names(
    hasher: types.ModuleType, method: str
) -> None:
    with pytest.raises(AttributeError, match="never dispatched"):
        Dispatcher(hasher).lookup(method)


def test_dispatcher_refuses_private_names_listed_in_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = make_module(
        monkeypatch,
        "txtask_test_private_all",
        '__all__ = ["_hidden"]\ndef _hidden():\n    return 1',
    )
    with pytest.raises(AttributeError, match="never dispatched"):
        Dispatcher(module).lookup("_hidden")


def test_dispatcher_module_refuses_a_direct_call(hasher: types.ModuleType) -> None:
    with pytest.raises(TypeError, match="not callable"):
        Dispatcher(hasher).lookup(None)


# Dispatcher: mappings, instances, classes, functions


def test_dispatcher_mapping_calls_its_items() -> None:
    dispatcher = Dispatcher({"double": lambda n: 2 * n})
    assert dispatcher.lookup("double")(4) == 8


def test_dispatcher_mapping_does_not_expose_its_own_methods() -> None:
    """A dict interface's `keys` method is not one of its items."""
    with pytest.raises(AttributeError, match="no method 'keys'"):
        Dispatcher({"double": lambda n: 2 * n}).lookup("keys")


def test_dispatcher_mapping_refuses_a_non_callable_item() -> None:
    with pytest.raises(AttributeError, match="not callable"):
        Dispatcher({"limit": 3}).lookup("limit")


class Counter:
    instances = 0

    def __init__(self) -> None:
        Counter.instances += 1
        self.count = 0
        self.label = "counter"

    def add(self, amount: int = 1) -> int:
        self.count += amount
        return self.count

    def __call__(self, value: Any) -> Any:
        return ("called", value)

    def _reset(self) -> None:
        self.count = 0


def test_dispatcher_instance_calls_its_methods() -> None:
    dispatcher = Dispatcher(Counter())
    dispatcher.lookup("add")(2)
    assert dispatcher.lookup("add")(3) == 5


def test_dispatcher_instance_is_called_directly() -> None:
    assert Dispatcher(Counter()).lookup(None)(7) == ("called", 7)


def test_dispatcher_instance_refuses_a_missing_method() -> None:
    with pytest.raises(AttributeError, match="no method 'subtract'"):
        Dispatcher(Counter()).lookup("subtract")


def test_dispatcher_instance_refuses_a_non_callable_attribute() -> None:
    with pytest.raises(AttributeError, match="'label' is not callable"):
        Dispatcher(Counter()).lookup("label")


def test_dispatcher_build_instantiates_a_class_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Counter, "instances", 0)
    dispatcher = Dispatcher.build(Counter)
    dispatcher.lookup("add")()
    assert dispatcher.lookup("add")() == 2
    assert Counter.instances == 1


def test_dispatcher_build_keeps_an_instance() -> None:
    counter = Counter()
    Dispatcher.build(counter).lookup("add")(5)
    assert counter.count == 5


def test_dispatcher_function_gets_the_method_name_first() -> None:
    def interface(*args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    assert Dispatcher(interface).lookup("hash")("pw", rounds=2) == (
        ("hash", "pw"),
        {"rounds": 2},
    )


def test_dispatcher_function_is_called_directly() -> None:
    def interface(*args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    assert Dispatcher(interface).lookup(None)(1, key=2) == ((1,), {"key": 2})


def test_dispatcher_function_refuses_private_names() -> None:
    with pytest.raises(AttributeError, match="never dispatched"):
        Dispatcher(lambda *args: args).lookup("_internal")


# resolve


def test_resolve_imports_a_module_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "txtask_test_onfile.py").write_text("def ping():\n    return 'pong'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "txtask_test_onfile", raising=False)
    module = resolve("txtask_test_onfile")
    assert module.ping() == "pong"


def test_resolve_follows_dotted_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    make_module(
        monkeypatch,
        "txtask_test_nested",
        "class Outer:\n    class Inner:\n        value = 42",
    )
    assert resolve("txtask_test_nested:Outer.Inner").value == 42


def test_resolve_raises_import_error_for_a_missing_module() -> None:
    with pytest.raises(ImportError):
        resolve("txtask_test_no_such_module")


def test_resolve_raises_attribute_error_for_a_missing_attribute(
    hasher: types.ModuleType,
) -> None:
    with pytest.raises(AttributeError):
        resolve("txtask_test_hasher:crack")


# Worker


class Connection:
    """
    The client's end of a socketpair whose other end a L{Worker} serves.
    """

    def __init__(self) -> None:
        self.client, self.worker = socket.socketpair()
        self.control_read, self.control_write = os.pipe()

    def send(self, *messages: list[Any]) -> None:
        for message in messages:
            self.client.sendall(_wire.encode(message))

    def send_raw(self, data: bytes) -> None:
        self.client.sendall(data)

    def stop(self) -> None:
        """
        Close the control pipe, as the server does on a graceful stop.
        """
        if self.control_write is not None:
            os.close(self.control_write)
            self.control_write = None

    def serve(self, interface: str, **options: Any) -> list[Any]:
        """
        End the input, run the worker until it returns, and decode what it
        sent back.
        """
        self.client.shutdown(socket.SHUT_WR)
        served = _Descriptor(self.worker.fileno())
        Worker(served, self.control_read, interface, **options).run()

        # Shut down rather than close: closing with the client's frames
        # unread would reset the connection before the replies are read.
        self.worker.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := self.client.recv(65536):
            data += chunk
        return decode_frames(data)

    def close(self) -> None:
        self.stop()
        os.close(self.control_read)
        self.client.close()
        self.worker.close()


@pytest.fixture
def connection() -> Iterator[Connection]:
    opened = Connection()
    yield opened
    opened.close()


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """
    An interface module that counts setup and checkout_done runs.
    """
    return make_module(
        monkeypatch,
        "txtask_test_service",
        """
        setups = 0
        dones = 0
        stop_pipe = None

        def setup():
            global setups
            setups += 1

        def failing_setup():
            raise OSError("database is down")

        def checkout_done():
            global dones
            dones += 1

        def failing_checkout_done():
            raise RuntimeError("rollback failed")

        def setups_seen():
            return setups

        def dones_seen():
            return dones

        def echo(*args, **kwargs):
            return [list(args), kwargs]

        def explode(text):
            raise ValueError(text)

        def unsendable():
            return object()

        status_page = None

        def status():
            from txtask.worker import STATUS_COUNTER
            return STATUS_COUNTER.unpack_from(status_page)[0]

        def stop_server():
            import os
            os.close(stop_pipe)
            return "stopping"
        """,
    )


SERVICE = "txtask_test_service"


def hello() -> list[Any]:
    return ["hello", _wire.PROTOCOL_VERSION, os.getpid()]


def test_worker_says_hello_with_its_pid(
    connection: Connection, service: types.ModuleType
) -> None:
    assert connection.serve(SERVICE) == [hello()]


def test_worker_answers_a_call(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(["call", "echo", [1, "two"], {"three": 3.0}])
    assert connection.serve(SERVICE) == [hello(), ["ok", [[1, "two"], {"three": 3.0}]]]


def test_worker_answers_calls_in_order(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(["call", "echo", [1], {}], ["call", "echo", [2], {}])
    assert connection.serve(SERVICE)[1:] == [["ok", [[1], {}]], ["ok", [[2], {}]]]


def test_worker_replies_remote_error_and_stays_alive(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(["call", "explode", ["bad input"], {}], ["call", "echo", [], {}])
    _, failed, answered = connection.serve(SERVICE)
    assert failed[:4] == ["error", "remote", "ValueError", "bad input"]
    assert "in explode" in failed[4]
    assert answered == ["ok", [[], {}]]


def test_worker_replies_remote_error_for_a_missing_method(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(["call", "crack", [], {}], ["call", "echo", [], {}])
    _, failed, answered = connection.serve(SERVICE)
    assert failed[:3] == ["error", "remote", "AttributeError"]
    assert "crack" in failed[3]
    assert answered[0] == "ok"


def test_worker_replies_remote_error_for_a_private_method(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(["call", "_private", [], {}])
    _, failed = connection.serve(SERVICE)
    assert failed[:3] == ["error", "remote", "AttributeError"]


def test_worker_replies_remote_error_for_non_string_keyword_names(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(["call", "echo", [], {1: "one"}])
    _, failed = connection.serve(SERVICE)
    assert failed[:3] == ["error", "remote", "TypeError"]


def test_worker_replies_remote_error_naming_an_unsendable_return_type(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(["call", "unsendable", [], {}], ["call", "echo", [], {}])
    _, failed, answered = connection.serve(SERVICE)
    assert failed[:3] == ["error", "remote", "TypeError"]
    assert "unsendable()" in failed[3]
    assert "of type object" in failed[3]
    assert answered[0] == "ok"


def test_worker_runs_setup_once_before_the_first_call(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(
        ["call", "setups_seen", [], {}],
        ["done"],
        ["call", "setups_seen", [], {}],
    )
    replies = connection.serve(SERVICE, setup=f"{SERVICE}:setup")
    assert replies[1:] == [["ok", 1], ["ok", 1]]
    assert service.setups == 1


def test_worker_runs_setup_before_the_first_call(
    connection: Connection, service: types.ModuleType
) -> None:
    """A standby worker is ready before anyone checks it out."""
    connection.serve(SERVICE, setup=f"{SERVICE}:setup")
    assert service.setups == 1


def test_worker_replies_setup_error_to_every_call(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(["call", "echo", [], {}], ["call", "echo", [], {}])
    _, first, second = connection.serve(SERVICE, setup=f"{SERVICE}:failing_setup")
    assert first[:4] == ["error", "setup", "OSError", "database is down"]
    assert second == first


def test_worker_replies_setup_error_when_the_interface_cannot_be_imported(
    connection: Connection,
) -> None:
    connection.send(["call", "echo", [], {}])
    _, failed = connection.serve("txtask_test_no_such_module")
    assert failed[:3] == ["error", "setup", "ModuleNotFoundError"]


def test_worker_instantiates_a_class_interface_once(
    connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_module(
        monkeypatch,
        "txtask_test_class_service",
        """
        class Service:
            made = 0

            def __init__(self):
                Service.made += 1

            def made_count(self):
                return Service.made
        """,
    )
    connection.send(
        ["call", "made_count", [], {}], ["done"], ["call", "made_count", [], {}]
    )
    replies = connection.serve("txtask_test_class_service:Service")
    assert replies[1:] == [["ok", 1], ["ok", 1]]


def test_worker_runs_checkout_done_on_done(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(
        ["call", "dones_seen", [], {}],
        ["done"],
        ["call", "dones_seen", [], {}],
        ["done"],
    )
    replies = connection.serve(SERVICE, checkout_done=f"{SERVICE}:checkout_done")
    assert replies[1:] == [["ok", 0], ["ok", 1]]
    assert service.dones == 2


def test_worker_says_bye_when_checkout_done_fails(
    connection: Connection, service: types.ModuleType
) -> None:
    """Its state is unknown, so it takes no further checkout."""
    connection.send(["call", "echo", [], {}], ["done"], ["call", "echo", [], {}])
    replies = connection.serve(
        SERVICE, checkout_done=f"{SERVICE}:failing_checkout_done"
    )
    assert replies == [hello(), ["ok", [[], {}]], ["bye"]]


def test_worker_says_bye_when_the_control_pipe_closes_between_checkouts(
    connection: Connection, service: types.ModuleType
) -> None:
    """The call already waiting is left for the client to move elsewhere."""
    connection.send(["call", "echo", [], {}])
    connection.stop()
    assert connection.serve(SERVICE) == [hello(), ["bye"]]


def test_worker_finishes_its_checkout_when_the_control_pipe_closes(
    connection: Connection, service: types.ModuleType
) -> None:
    service.stop_pipe = connection.control_write
    connection.control_write = None
    connection.send(
        ["call", "stop_server", [], {}],
        ["call", "echo", [], {}],
        ["done"],
        ["call", "echo", ["next checkout"], {}],
    )
    assert connection.serve(SERVICE) == [
        hello(),
        ["ok", "stopping"],
        ["ok", [[], {}]],
        ["bye"],
    ]


def test_worker_exits_on_a_protocol_error(
    connection: Connection, service: types.ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    """After a malformed message it answers nothing more, not even later calls."""
    connection.send(["launch"], ["call", "echo", [], {}])
    with caplog.at_level(logging.ERROR, logger="txtask.worker"):
        assert connection.serve(SERVICE) == [hello()]
    assert [record.levelno for record in caplog.records] == [logging.ERROR]


def test_worker_exits_on_an_oversized_frame(
    connection: Connection, service: types.ModuleType
) -> None:
    connection.send(["call", "echo", ["x" * 200], {}], ["call", "echo", [], {}])
    assert connection.serve(SERVICE, max_frame_size=100) == [hello()]


def test_worker_exits_on_a_frame_cut_short(
    connection: Connection, service: types.ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    connection.send_raw(_wire.encode(["call", "echo", [], {}])[:-2])
    with caplog.at_level(logging.ERROR, logger="txtask.worker"):
        assert connection.serve(SERVICE) == [hello()]
    assert [record.levelno for record in caplog.records] == [logging.ERROR]


def test_worker_counts_calls(connection: Connection, service: types.ModuleType) -> None:
    connection.client.sendall(
        _wire.encode(["call", "echo", [], {}]) + _wire.encode(["call", "echo", [], {}])
    )
    connection.client.shutdown(socket.SHUT_WR)
    worker = Worker(connection.worker, connection.control_read, SERVICE)
    worker.run()
    assert worker.calls == 2


def test_worker_marks_its_status_page_odd_while_a_call_runs(
    connection: Connection, service: types.ModuleType
) -> None:
    """
    The server reads the page to find a worker hung in one call, or in
    setup (counted first).
    """
    with mmap.mmap(-1, STATUS_COUNTER.size) as page:
        service.status_page = page
        connection.send(["call", "status", [], {}], ["call", "status", [], {}])
        replies = connection.serve(SERVICE, status=page)
        assert replies[1:] == [["ok", 3], ["ok", 5]]
        assert STATUS_COUNTER.unpack_from(page)[0] == 6


def test_descriptor_sends_all_of_a_large_frame() -> None:
    """Bytes beyond one write()'s worth (a full socket buffer) still go out."""
    ours, theirs = socket.socketpair()
    payload = os.urandom(4 * 1024 * 1024)
    received = bytearray()

    def read() -> None:
        while chunk := ours.recv(65536):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    _Descriptor(theirs.fileno()).sendall(payload)
    theirs.close()
    reader.join(timeout=10)
    ours.close()
    assert bytes(received) == payload


def test_descriptor_receives_what_was_sent() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(b"frame")
        assert _Descriptor(theirs.fileno()).recv(100) == b"frame"


def test_worker_whose_client_left_before_the_hello_exits_quietly() -> None:
    """No traceback for a client that was gone before the worker started."""
    ours, theirs = socket.socketpair()
    control_read, control_write = os.pipe()
    ours.close()
    try:
        worker = Worker(_Descriptor(theirs.fileno()), control_read, SERVICE)
        worker.run()
        assert worker.calls == 0
    finally:
        theirs.close()
        os.close(control_read)
        os.close(control_write)
