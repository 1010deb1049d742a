"""The agent's framing (microvm/agent/protocol.py): whole messages out, or ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from microvm.agent.protocol import HEADER, MAX_FRAME, FrameReader, ProtocolError, decode, encode


def test_messages_survive_any_split() -> None:
    messages = [{"id": 1, "op": "ping"}, {"id": 2, "data": bytes(range(256)) * 10}, {"id": 3, "end": True}]
    stream = b"".join(encode(m) for m in messages)
    for cut in range(len(stream)):
        reader = FrameReader()
        got = list(reader.feed(stream[:cut])) + list(reader.feed(stream[cut:]))
        assert got == messages
        assert reader.buffered == 0


def test_byte_by_byte() -> None:
    reader = FrameReader()
    got = []
    for b in encode({"id": 7, "ev": "out", "fd": 1, "data": b"hello"}):
        got += reader.feed(bytes([b]))
    assert got == [{"id": 7, "ev": "out", "fd": 1, "data": b"hello"}]


def test_an_oversized_frame_is_refused_before_it_is_buffered() -> None:
    reader = FrameReader(max_frame=1024)
    with pytest.raises(ProtocolError, match="frame of 1025 bytes announced; the limit is 1024"):
        list(reader.feed(HEADER.pack(1025)))
    assert reader.buffered <= HEADER.size
    with pytest.raises(ProtocolError, match="over the limit"):
        encode({"id": 1, "data": bytes(MAX_FRAME)})


@pytest.mark.parametrize(("body", "why"), [
    (msgpack.packb([1, 2]), "holds a list, not a map"),
    (msgpack.packb({"op": "ping"}), "without a valid id"),
    (msgpack.packb({"id": -1}), "without a valid id"),
    (msgpack.packb({"id": "1"}), "without a valid id"),
    (msgpack.packb({1: 2, "id": 1}), "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),
    (msgpack.packb({"id": 1}) + b"\x00", "not valid msgpack"),
    (b"", "not valid msgpack"),
])
def test_garbled_frames_name_the_problem(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode(body)


@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=64))
def test_any_bytes_give_messages_or_protocol_error_only(data: bytes, step: int) -> None:
    reader = FrameReader(max_frame=2048)
    try:
        for i in range(0, len(data), step):
            for message in reader.feed(data[i:i + step]):
                assert isinstance(message, dict) and isinstance(message["id"], int)
    except ProtocolError:
        pass
    assert reader.buffered <= 2048 + HEADER.size + step


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-2**63, 2**64 - 1), st.binary(max_size=64),
                                                       st.text(max_size=16), st.none(), st.booleans()),
                       max_size=6),
       st.integers(min_value=0, max_value=2**32))
def test_any_message_round_trips(fields: dict[str, object], rid: int) -> None:
    message = {**fields, "id": rid}
    assert list(FrameReader().feed(encode(message))) == [message]
