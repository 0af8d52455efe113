"""
Tests for L{txtask._wire}: frames, messages, and the values that cross.
"""

from __future__ import annotations

import math
import struct
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txtask import _wire
from txtask.errors import ProtocolError

BOUNDED = settings(max_examples=200, deadline=None)

MESSAGES = [
    ["call", "hash", ["secret"], {"rounds": 12}],
    ["ok", None],
    ["error", "remote", "ValueError", "bad", "Traceback..."],
    ["done"],
]


def stream() -> bytes:
    return b"".join(_wire.encode(message) for message in MESSAGES)


def test_frame_decoder_whole_stream() -> None:
    assert _wire.FrameDecoder().feed(stream()) == MESSAGES


def test_frame_decoder_one_byte_at_a_time() -> None:
    decoder = _wire.FrameDecoder()
    messages = []
    for index in range(len(stream())):
        messages += decoder.feed(stream()[index : index + 1])
    assert messages == MESSAGES
    assert decoder.pending == 0


def test_frame_decoder_several_frames_and_a_partial_one_per_chunk() -> None:
    """A chunk ending inside a frame yields the whole frames before it."""
    data = stream()
    cut = len(data) - 3
    decoder = _wire.FrameDecoder()
    assert decoder.feed(data[:cut]) == MESSAGES[:-1]
    assert decoder.feed(data[cut:]) == MESSAGES[-1:]


def test_frame_decoder_pending_counts_a_trailing_partial_frame() -> None:
    frame = _wire.encode(["ok", "x" * 10])
    decoder = _wire.FrameDecoder()
    assert decoder.feed(_wire.DONE + frame[:7]) == [["done"]]
    assert decoder.pending == 7


def test_frame_decoder_pending_counts_a_partial_header() -> None:
    decoder = _wire.FrameDecoder()
    assert decoder.feed(_wire.DONE[:2]) == []
    assert decoder.pending == 2


def test_frame_decoder_refuses_an_oversized_frame_from_its_header() -> None:
    """The size is checked before the body arrives, so it is never buffered."""
    decoder = _wire.FrameDecoder(max_frame_size=100)
    with pytest.raises(ProtocolError, match="101 bytes exceeds the limit of 100"):
        decoder.feed(struct.pack(">I", 101))


def test_frame_decoder_accepts_a_frame_at_the_limit() -> None:
    frame = _wire.encode(["ok", b"x" * 50])
    decoder = _wire.FrameDecoder(max_frame_size=len(frame) - 4)
    assert decoder.feed(frame) == [["ok", b"x" * 50]]


def test_frame_decoder_refuses_garbage_with_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="undecodable frame"):
        _wire.FrameDecoder().feed(struct.pack(">I", 1) + b"\xc1")


def test_frame_decoder_refuses_a_body_holding_two_values() -> None:
    with pytest.raises(ProtocolError):
        _wire.FrameDecoder().feed(struct.pack(">I", 2) + b"\x01\x02")


def test_frame_decoder_refuses_an_empty_body() -> None:
    with pytest.raises(ProtocolError):
        _wire.FrameDecoder().feed(struct.pack(">I", 0))


def test_frame_decoder_refuses_an_unknown_extension_type() -> None:
    # fixext 1 with type 42.
    with pytest.raises(ProtocolError, match="extension type 42"):
        _wire.FrameDecoder().feed(struct.pack(">I", 3) + b"\xd4\x2a\x00")


def test_encode_refuses_an_unknown_type_naming_it() -> None:
    with pytest.raises(TypeError, match="object"):
        _wire.encode(["ok", object()])


def test_encode_refuses_a_naive_datetime() -> None:
    """Its instant is ambiguous, so it never crosses."""
    with pytest.raises(TypeError, match="datetime"):
        _wire.encode(["ok", datetime(2024, 1, 1, 12, 0)])


def test_encode_refuses_a_lone_surrogate() -> None:
    with pytest.raises(TypeError):
        _wire.encode(["ok", "\ud800"])


def test_encode_dict_with_tuple_keys_arrives_with_tuple_keys() -> None:
    """
    A list cannot be a dict key, so a key that was a tuple (nested or not)
    comes back as a tuple while the values keep the list rule.
    """
    value = {(1, (2, "b")): (3, 4), "plain": {("x",): None}}
    assert _wire.FrameDecoder().feed(_wire.encode(["ok", value])) == [
        ["ok", {(1, (2, "b")): [3, 4], "plain": {("x",): None}}]
    ]


@pytest.mark.parametrize(
    "instant",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
    ],
    ids=["before-year-1-in-utc", "after-year-9999-in-utc"],
)
def test_encode_refuses_a_datetime_with_no_utc_datetime(instant: datetime) -> None:
    """
    It comes back in UTC, where this instant has no datetime: encoding it
    would make the peer drop the connection instead of failing the call.
    """
    with pytest.raises(TypeError):
        _wire.encode(["ok", instant])


def test_call_encodes_tuples_as_lists() -> None:
    frame = _wire.call("hash", ("a", (1, 2)), {"key": None})
    assert _wire.FrameDecoder().feed(frame) == [
        ["call", "hash", ["a", [1, 2]], {"key": None}]
    ]


def test_call_refuses_an_unencodable_argument() -> None:
    with pytest.raises(TypeError):
        _wire.call("hash", (object(),), {})


def test_hello_carries_protocol_version_and_pid() -> None:
    assert _wire.FrameDecoder().feed(_wire.hello(1234)) == [
        ["hello", _wire.PROTOCOL_VERSION, 1234]
    ]


def test_error_carries_kind_type_message_and_traceback() -> None:
    frame = _wire.error("setup", "OSError", "no db", "Traceback...")
    assert _wire.FrameDecoder().feed(frame) == [
        ["error", "setup", "OSError", "no db", "Traceback..."]
    ]


# check_message


@pytest.mark.parametrize(
    "message",
    [
        ["hello", 1, 4242],
        ["ok", None],
        ["ok", {"nested": [1, 2]}],
        ["error", "remote", "ValueError", "bad", ""],
        ["bye"],
    ],
)
def test_check_message_accepts_worker_messages(message: list[Any]) -> None:
    assert _wire.check_message(message, _wire.WORKER_MESSAGES) is message


@pytest.mark.parametrize(
    "message",
    [["call", "hash", [1], {}], ["call", None, [], {"k": 1}], ["done"]],
)
def test_check_message_accepts_client_messages(message: list[Any]) -> None:
    assert _wire.check_message(message, _wire.CLIENT_MESSAGES) is message


@pytest.mark.parametrize(
    "value",
    ["hello", {"verb": "ok"}, ("ok", 1), None, 7],
    ids=["str", "dict", "tuple", "none", "int"],
)
def test_check_message_refuses_a_non_list(value: Any) -> None:
    with pytest.raises(ProtocolError, match="expected a message list"):
        _wire.check_message(value, _wire.WORKER_MESSAGES)


def test_check_message_refuses_an_empty_list() -> None:
    with pytest.raises(ProtocolError):
        _wire.check_message([], _wire.WORKER_MESSAGES)


@pytest.mark.parametrize("verb", ["launch", b"ok", 1, None, ["ok"]])
def test_check_message_refuses_an_unknown_verb(verb: Any) -> None:
    with pytest.raises(ProtocolError, match="unknown message verb"):
        _wire.check_message([verb], _wire.WORKER_MESSAGES)


def test_check_message_refuses_a_verb_of_the_other_side() -> None:
    """A worker never sends "call", a client never sends "ok"."""
    with pytest.raises(ProtocolError):
        _wire.check_message(["call", "f", [], {}], _wire.WORKER_MESSAGES)
    with pytest.raises(ProtocolError):
        _wire.check_message(["ok", 1], _wire.CLIENT_MESSAGES)


@pytest.mark.parametrize(
    "message",
    [["ok"], ["ok", 1, [], 2], ["bye", None], ["hello", 1], ["error", "a", "b", "c"]],
)
def test_check_message_refuses_a_wrong_field_count(message: list[Any]) -> None:
    with pytest.raises(ProtocolError, match="fields, expected"):
        _wire.check_message(message, _wire.WORKER_MESSAGES)


@pytest.mark.parametrize(
    "message",
    [["ok", 1, "not a list"], ["error", "remote", "E", "m", "tb", {}]],
)
def test_check_message_refuses_events_that_are_not_a_list(message: list[Any]) -> None:
    with pytest.raises(ProtocolError, match="field"):
        _wire.check_message(message, _wire.WORKER_MESSAGES)


def test_check_events_accepts_records_and_timers() -> None:
    events = [
        ["log", 1.5, 20, "app.db", "connected", None],
        ["log", 2, 40, "app", "failed", "Traceback ..."],
        ["timer", "sql", 1.0, 2.5],
    ]
    assert _wire.check_events(events) is events


@pytest.mark.parametrize(
    "event",
    [
        "log",
        ["log", 1.5, "INFO", "app", "text", None],
        ["log", 1.5, 20, "app", "text"],
        ["timer", "sql", "now", 2.0],
        ["trace", "x"],
    ],
)
def test_check_events_refuses_malformed_events(event: Any) -> None:
    with pytest.raises(ProtocolError):
        _wire.check_events([event])


@pytest.mark.parametrize(
    "message",
    [
        ["call", 3, [], {}],
        ["call", "f", {}, {}],
        ["call", "f", [], []],
        ["call", b"f", [], {}],
    ],
)
def test_check_message_refuses_wrong_field_types(message: list[Any]) -> None:
    with pytest.raises(ProtocolError, match="not the expected type"):
        _wire.check_message(message, _wire.CLIENT_MESSAGES)


def test_check_message_refuses_a_hello_without_integer_pid() -> None:
    with pytest.raises(ProtocolError):
        _wire.check_message(["hello", 1, "4242"], _wire.WORKER_MESSAGES)


# Property tests


def _utc_offsets() -> st.SearchStrategy[timezone]:
    minutes = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59)
    return minutes.map(lambda m: timezone(timedelta(minutes=m)))


# One day inside datetime's range at each end, so that every instant also
# exists in UTC, which is how it comes back.
aware_datetimes = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=_utc_offsets(),
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats()
    | st.text()
    | st.binary()
    | aware_datetimes
)

keys = st.none() | st.booleans() | st.integers() | st.text() | st.binary()

values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.tuples(children, children)
        | st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=20,
)


def assert_same(sent: Any, received: Any) -> None:
    """
    C{received} is what C{sent} becomes on the wire: same types, tuples as
    lists, NaN as NaN, -0.0 as -0.0, datetimes as the same instant in UTC.
    """
    if isinstance(sent, tuple):
        sent = list(sent)
    if isinstance(sent, datetime):
        assert isinstance(received, datetime)
        assert received == sent
        assert received.utcoffset() == timedelta(0)
        return
    assert type(received) is type(sent), (sent, received)
    if isinstance(sent, float):
        if math.isnan(sent):
            assert math.isnan(received)
        else:
            assert received == sent
            assert math.copysign(1, received) == math.copysign(1, sent)
    elif isinstance(sent, list):
        assert len(received) == len(sent)
        for one, other in zip(sent, received, strict=True):
            assert_same(one, other)
    elif isinstance(sent, dict):
        assert len(received) == len(sent)
        for key, value in sent.items():
            assert key in received
            received_key = next(k for k in received if k == key)
            assert type(received_key) is type(key)
            assert_same(value, received[key])
    else:
        assert received == sent


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    edges = [0, *cuts, len(data)]
    return [data[start:end] for start, end in zip(edges, edges[1:], strict=False)]


@BOUNDED
@given(st.lists(values, min_size=1, max_size=4), st.data())
def test_encode_round_trips_every_value_in_any_chunking(
    sent: list[Any], data: st.DataObject
) -> None:
    frames = b"".join(_wire.encode(["ok", value]) for value in sent)
    decoder = _wire.FrameDecoder()
    received = []
    for chunk in data.draw(chunkings(frames)):
        received += decoder.feed(chunk)
    assert decoder.pending == 0
    assert len(received) == len(sent)
    for value, message in zip(sent, received, strict=True):
        assert message[0] == "ok"
        assert_same(value, message[1])


any_datetimes = st.datetimes(timezones=_utc_offsets())
hashables = st.recursive(
    keys | any_datetimes, lambda children: st.tuples(children, children), max_leaves=4
)
anything = st.recursive(
    scalars | any_datetimes,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(hashables, children, max_size=4)
    ),
    max_leaves=12,
)


@BOUNDED
@given(anything)
def test_encode_accepts_only_what_the_peer_can_decode(value: Any) -> None:
    """Whatever encode lets through, the other side can read back."""
    try:
        frame = _wire.encode(["ok", value])
    except TypeError:
        return
    assert len(_wire.FrameDecoder().feed(frame)) == 1


@BOUNDED
@given(st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1))
def test_encode_round_trips_integers_beyond_64_bits(number: int) -> None:
    (message,) = _wire.FrameDecoder().feed(_wire.encode(["ok", number]))
    assert message == ["ok", number]
    assert type(message[1]) is int


@pytest.mark.parametrize(
    "number",
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**40, -(10**40)],
)
def test_encode_round_trips_integers_at_the_64_bit_edges(number: int) -> None:
    assert _wire.FrameDecoder().feed(_wire.encode(["ok", number])) == [["ok", number]]


@pytest.mark.parametrize("number", [math.inf, -math.inf, -0.0, 5e-324])
def test_encode_round_trips_special_floats(number: float) -> None:
    (message,) = _wire.FrameDecoder().feed(_wire.encode(["ok", number]))
    assert_same(number, message[1])


def test_encode_round_trips_nan() -> None:
    (message,) = _wire.FrameDecoder().feed(_wire.encode(["ok", math.nan]))
    assert math.isnan(message[1])


def test_encode_returns_datetimes_as_the_same_instant_in_utc() -> None:
    sent = datetime(2024, 3, 1, 9, 30, 0, 123456, tzinfo=timezone(timedelta(hours=5)))
    (message,) = _wire.FrameDecoder().feed(_wire.encode(["ok", sent]))
    assert message[1] == sent
    assert message[1].tzinfo == timezone.utc
    assert message[1].hour == 4


def test_encode_round_trips_astral_text() -> None:
    text = "pile of \U0001f4a9 and \U00010348"
    assert _wire.FrameDecoder().feed(_wire.encode(["ok", text])) == [["ok", text]]


@BOUNDED
@given(st.binary(max_size=400), st.data())
def test_frame_decoder_turns_any_bytes_into_values_or_protocol_error(
    garbage: bytes, data: st.DataObject
) -> None:
    """
    Whatever arrives, in whatever chunks, the decoder returns messages or
    raises ProtocolError, and never keeps more than one frame's worth.
    """
    decoder = _wire.FrameDecoder(max_frame_size=64)
    try:
        for chunk in data.draw(chunkings(garbage)):
            decoder.feed(chunk)
            assert decoder.pending <= 4 + 64
    except ProtocolError:
        pass


@BOUNDED
@given(st.binary(max_size=200))
def test_frame_decoder_turns_any_body_into_a_value_or_protocol_error(
    body: bytes,
) -> None:
    """Every size is valid here, so the body itself is what gets decoded."""
    try:
        _wire.FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    except ProtocolError:
        pass


@BOUNDED
@given(st.binary(max_size=200))
def test_check_message_turns_any_decoded_value_into_a_message_or_protocol_error(
    body: bytes,
) -> None:
    try:
        for value in _wire.FrameDecoder().feed(struct.pack(">I", len(body)) + body):
            _wire.check_message(value, _wire.WORKER_MESSAGES)
            _wire.check_message(value, _wire.CLIENT_MESSAGES)
    except ProtocolError:
        pass
