"""
Frames and messages: the bytes that cross a worker connection.

A frame is a 4-byte big-endian length followed by that many bytes of
msgpack holding one message, a list whose first item is a verb. The worker
and the client both use this module, so it is plain Python: no Twisted, no
transport, no reactor. C{docs/protocol.md} describes every message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime, timezone

import msgpack

from txtask.errors import ProtocolError

# Workers import this module; typing alone would add milliseconds to
# every worker's start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    #: A decoded msgpack value: what crosses the wire.
    Value = Any
    #: A decoded message: a list led by its verb.
    Message = list

#: Version sent in the worker's hello; a client refuses any other.
PROTOCOL_VERSION = 1

#: Largest frame body accepted by default, in bytes (64 MiB).
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024

_HEADER = struct.Struct(">I")
# A frame body smaller than this is sliced off its chunk (a copy) rather than
# viewed: for small bodies the copy costs less than the view.
_COPY_BELOW = 4096
_BIG_INT = 1


def _pack_default(value: object) -> object:
    # msgpack's own integers stop at 64 bits; larger ones travel as the
    # two's-complement bytes of an extension type.
    if isinstance(value, int):
        size = (value.bit_length() + 8) // 8
        return msgpack.ExtType(_BIG_INT, value.to_bytes(size, "big", signed=True))
    if isinstance(value, datetime):
        return _timestamp(value)
    raise TypeError(f"cannot encode a value of type {type(value).__name__}")


def _timestamp(value: datetime) -> msgpack.Timestamp:
    """
    The instant of an aware datetime, which the peer rebuilds in UTC.
    """
    if value.utcoffset() is None:
        raise TypeError(f"cannot encode a naive datetime ({value}): give it a tzinfo")
    try:
        value.astimezone(timezone.utc)
    except OverflowError:
        raise TypeError(
            f"cannot encode {value}: in UTC it falls outside the years 1-9999"
        ) from None
    return msgpack.Timestamp.from_datetime(value)


def _ext_hook(code: int, data: bytes) -> object:
    if code == _BIG_INT:
        return int.from_bytes(data, "big", signed=True)
    raise ProtocolError(f"unknown msgpack extension type {code}")


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, default=_pack_default)


_pack = _packer().pack


def encode(message: Message) -> bytes:
    """
    Encode one message as a frame.

    @raise TypeError: A value in the message cannot cross the wire (an
        unknown type, a naive datetime); the message names it.
    """
    try:
        body = _pack(message)
    except (TypeError, ValueError, OverflowError) as error:
        raise TypeError(str(error)) from error
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> Value:
    """
    Decode one frame body.

    @raise ProtocolError: The body is not exactly one msgpack value.
    """
    try:
        try:
            # Spelled out rather than through _unpack: this runs for every
            # frame on both sides.
            return msgpack.unpackb(
                body,
                raw=False,
                timestamp=3,
                strict_map_key=False,
                ext_hook=_ext_hook,
            )
        except TypeError:
            # A dict key that was a tuple arrives as an unhashable list; only
            # this rare case pays for rebuilding every dict in Python.
            return _unpack(body, object_pairs_hook=_dict_with_tuple_keys)
    except ProtocolError:
        raise
    except (
        ValueError,
        TypeError,
        OverflowError,
        RecursionError,
        msgpack.UnpackException,
    ) as error:
        raise ProtocolError(f"undecodable frame: {_explain(error)}") from error


def _explain(error: Exception) -> str:
    # Some of msgpack's errors carry no text; their class says it all.
    if isinstance(error, msgpack.StackError):
        return "containers nested too deeply"
    if isinstance(error, msgpack.FormatError):
        return "not msgpack (a byte no msgpack value starts with)"
    if isinstance(error, RecursionError):
        return "containers nested too deeply"
    return str(error) or type(error).__name__


def _unpack(body: bytes | memoryview, **options: Any) -> Value:
    return msgpack.unpackb(
        body,
        raw=False,
        timestamp=3,
        strict_map_key=False,
        ext_hook=_ext_hook,
        **options,
    )


def _dict_with_tuple_keys(pairs: list[tuple[Value, Value]]) -> dict:
    return {_hashable(key): value for key, value in pairs}


def _hashable(key: Value) -> Value:
    if isinstance(key, list):
        return tuple(_hashable(item) for item in key)
    return key


class FrameDecoder:
    """
    Turn a stream of bytes, cut anywhere, into messages.

    @ivar max_frame_size: Largest frame body accepted, in bytes.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Value]:
        """
        Add bytes and return every message they complete, in order.

        @raise ProtocolError: A frame announces more than C{max_frame_size}
            bytes, or its body does not decode. The stream cannot be trusted
            after this; close the connection.
        """
        # The common case, whole frames in one chunk, decodes straight from
        # the chunk; only a partial frame is copied into the buffer.
        if not self._buffer and len(data) >= 4:
            (size,) = _HEADER.unpack_from(data)
            if size + 4 == len(data) and size <= self.max_frame_size:
                if size < _COPY_BELOW:
                    return [decode_body(data[4:])]
                with memoryview(data) as view:
                    return [decode_body(view[4:])]
        if self._buffer:
            self._buffer += data
            data = self._buffer
        messages = []
        offset = 0
        end_of_data = len(data)
        with memoryview(data) as view:
            while end_of_data - offset >= 4:
                (size,) = _HEADER.unpack_from(view, offset)
                if size > self.max_frame_size:
                    raise ProtocolError(
                        f"frame of {size} bytes exceeds the limit of "
                        f"{self.max_frame_size} bytes"
                    )
                end = offset + 4 + size
                if end > end_of_data:
                    break
                messages.append(decode_body(view[offset + 4 : end]))
                offset = end
        if data is self._buffer:
            del self._buffer[:offset]
        elif offset < end_of_data:
            self._buffer += data[offset:]
        return messages

    @property
    def pending(self) -> int:
        """
        Bytes held of a frame not yet complete.
        """
        return len(self._buffer)


def _shape(
    verb: str, *types: type | tuple[type, ...], optional: int = 0
) -> Callable[[list], list]:
    """
    A checker for messages of C{verb} whose fields have C{types}; the last
    C{optional} fields may be left out.
    """
    longest = len(types) + 1
    shortest = longest - optional
    typed = [
        (position, kind) for position, kind in enumerate(types, 1) if kind is not object
    ]
    expected = f"{len(types)}" if not optional else f"{shortest - 1} to {len(types)}"

    def check(message: list) -> list:
        length = len(message)
        if not shortest <= length <= longest:
            raise ProtocolError(
                f"{verb!r} message has {length - 1} fields, expected {expected}"
            )
        for position, kind in typed:
            if position < length and not isinstance(message[position], kind):
                raise ProtocolError(
                    f"field {position} of {verb!r} message is "
                    f"{type(message[position]).__name__}, not the expected type"
                )
        return message

    return check


_NAME = (str, type(None))
_NUMBER = (int, float)

#: Messages a worker sends, by verb. A reply may end with the events (log
#: records and timers) the request produced; see L{check_events}.
WORKER_MESSAGES = {
    "hello": _shape("hello", int, int),
    "ok": _shape("ok", object, list, optional=1),
    "error": _shape("error", str, str, str, str, list, optional=1),
    "bye": _shape("bye"),
}

#: Messages a client sends, by verb.
CLIENT_MESSAGES = {
    "call": _shape("call", _NAME, list, dict),
    "done": _shape("done"),
}

#: Events a reply carries, by kind: C{["log", time, levelno, logger name,
#: message, exception text or None]} and C{["timer", name, start, end]},
#: times in seconds since the epoch.
EVENTS = {
    "log": _shape("log", _NUMBER, int, str, str, _NAME),
    "timer": _shape("timer", str, _NUMBER, _NUMBER),
}


def check_events(events: list) -> list:
    """
    Check the events of a reply.

    @return: C{events}, unchanged.
    @raise ProtocolError: One is not a known event of the right shape.
    """
    for event in events:
        check_message(event, EVENTS)
    return events


def check_message(message: Value, shapes: dict[str, Callable[[list], list]]) -> list:
    """
    Check that a decoded value is a message of a known verb and shape.

    @param shapes: L{WORKER_MESSAGES} or L{CLIENT_MESSAGES}.
    @return: The message, unchanged.
    @raise ProtocolError: It is not.
    """
    if not isinstance(message, list) or not message:
        raise ProtocolError(f"expected a message list, got {type(message).__name__}")
    verb = message[0]
    check = shapes.get(verb) if isinstance(verb, str) else None
    if check is None:
        raise ProtocolError(f"unknown message verb {verb!r}")
    return check(message)


def check_client_message(message: Value) -> list:
    """
    L{check_message} against L{CLIENT_MESSAGES}, with the common case, a
    call, checked inline.
    """
    if (
        type(message) is list
        and len(message) == 4
        and message[0] == "call"
        and (message[1] is None or type(message[1]) is str)
        and type(message[2]) is list
        and type(message[3]) is dict
    ):
        return message
    return check_message(message, CLIENT_MESSAGES)


def check_worker_message(message: Value) -> list:
    """
    L{check_message} against L{WORKER_MESSAGES}, with the common case, a
    successful reply without events, checked inline.
    """
    if type(message) is list and len(message) == 2 and message[0] == "ok":
        return message
    return check_message(message, WORKER_MESSAGES)


def hello(pid: int) -> bytes:
    return encode(["hello", PROTOCOL_VERSION, pid])


def call(method: str | None, args: list | tuple, kwargs: dict) -> bytes:
    """
    Encode a call, before anything is sent.

    @raise TypeError: An argument cannot cross the wire.
    """
    # msgpack writes a tuple as an array, as it does a list.
    return encode(["call", method, args, kwargs])


DONE = encode(["done"])
BYE = encode(["bye"])


def ok(value: Value, events: list | None = None) -> bytes:
    """
    @raise TypeError: The value cannot cross the wire.
    """
    if events:
        return encode(["ok", value, events])
    return encode(["ok", value])


def error(
    kind: str,
    type_name: str,
    message: str,
    traceback: str,
    events: list | None = None,
) -> bytes:
    """
    @param kind: C{"remote"} for an exception in the interface, C{"setup"}
        for one in the setup function.
    """
    if events:
        return encode(["error", kind, type_name, message, traceback, events])
    return encode(["error", kind, type_name, message, traceback])
