"""The socket.io codec, session ids, offsets and cached event frames, without a network."""

from __future__ import annotations

import pytest

from services.core.envelope import Envelope, loads
from services.socket.history import Entry
from services.socket.socketio.frames import EventFrames
from services.socket.socketio.protocol import (
    CONNECT,
    EVENT,
    PacketError,
    SioPacket,
    ack_packet,
    connect_error_packet,
    decode,
    decode_payload,
)
from services.socket.socketio.recovery import (
    Offset,
    PidSigner,
    parse_offset,
    room_entry,
    split_room_entry,
    state_offset,
)
from services.socket.wsframe import message_text_frame


def ws_payload(frame: bytes) -> bytes:
    """The payload of an unmasked server text frame."""
    length = frame[1] & 0x7F
    return frame[2 + (2 if length == 126 else 8 if length == 127 else 0) :]


def test_decode_client_packets():
    assert decode("0") == SioPacket(CONNECT)
    assert decode('0{"token":"t"}') == SioPacket(CONNECT, data={"token": "t"})
    assert decode('0/admin,{"a":1}') == SioPacket(CONNECT, "/admin", None, {"a": 1})
    assert decode('212["join","room:1"]') == SioPacket(EVENT, "/", 12, ["join", "room:1"])
    assert decode('2/chat,3["x"]') == SioPacket(EVENT, "/chat", 3, ["x"])
    assert decode('51-["x",{"_placeholder":true,"num":0}]').attachments == 1
    assert decode("1").type == 1
    assert decode('3[1,"a"]').data == [1, "a"]


@pytest.mark.parametrize(
    "text",
    ["", "9", "x", "2", '2"join"', "2[]", '2["connect"]', "2[", '0["a"]', "4{}", "1{}", "5x-[]"],
)
def test_decode_refuses_bad_packets(text):
    with pytest.raises(PacketError):
        decode(text)


def test_payload_and_server_packets():
    assert decode_payload(b'40{"token":"x"}\x1e3') == ['40{"token":"x"}', "3"]
    assert decode_payload(b"") == []
    assert ack_packet(7, [{"ok": True}]) == b'437[{"ok":true}]'
    assert connect_error_packet("/admin", "Invalid namespace") == (
        b'44/admin,{"message":"Invalid namespace"}'
    )


def test_pid_is_signed_and_carries_the_session():
    signer = PidSigner("secret")
    pid = signer.sign("sid1", "ann", ["room:1"])
    session = signer.verify(pid)
    assert session is not None and session.sid == "sid1" and session.sub == "ann"
    assert session.rooms == ("room:1",)
    assert PidSigner("other").verify(pid) is None
    body, mac = pid.split(".")
    assert signer.verify(body + "x." + mac) is None
    assert signer.verify("garbage") is None and signer.verify(12) is None


def test_offsets():
    assert parse_offset("room:1/01HX") == Offset("room:1", "01HX", None)
    assert parse_offset("room:1/@1700000000000/1700000000500") == Offset(
        "room:1", "@1700000000000", 1700000000500
    )
    assert parse_offset("/1700000000000") == Offset(None, None, 1700000000000)
    for bad in ("", "room 1/x", "room:1/", "room:1/@x", "room:1/a/b", "/x", "a/b/c/d", 5):
        assert parse_offset(bad) is None
    assert state_offset(None, None, 5) == "/5"
    assert parse_offset(state_offset("r", "@1", 2)) == Offset("r", "@1", 2)


def test_an_offset_carries_a_signed_room_set():
    signer = PidSigner("secret")
    suffix = signer.rooms_suffix(["room:b", "room:a"])
    assert suffix.startswith("~room:a,room:b~")  # sorted: one suffix per room set
    offset = parse_offset("room:a/01HX" + suffix, max_rooms=2)
    assert offset is not None and offset.room == "room:a" and offset.position == "01HX"
    assert offset.rooms is not None and signer.verify_rooms(offset.rooms) == ("room:a", "room:b")
    assert PidSigner("other").verify_rooms(offset.rooms) is None
    forged = offset.rooms.replace("room:b", "room:c")
    assert signer.verify_rooms(forged) is None
    empty = parse_offset("/5" + signer.rooms_suffix([]))
    assert empty is not None and empty.rooms is not None and signer.verify_rooms(empty.rooms) == ()
    assert parse_offset("room:a/01HX~") is None
    # longer than 2 rooms, even with join positions, can be: refused before any HMAC
    assert parse_offset("room:a/01HX" + signer.rooms_suffix(["r" * 128] * 8), max_rooms=2) is None


def test_a_room_joined_moments_ago_carries_its_join_position():
    signer = PidSigner("secret")
    entries = [room_entry("room:a", None), room_entry("room:b", "01HX"), room_entry("c", "@17")]
    offset = parse_offset("room:a/01HY" + signer.rooms_suffix(entries), max_rooms=3)
    assert offset is not None and offset.rooms is not None
    signed = signer.verify_rooms(offset.rooms)
    assert signed is not None
    assert [split_room_entry(e) for e in signed] == [
        ("c", "@17"),
        ("room:a", None),
        ("room:b", "01HX"),
    ]
    for bad in ("room:b/", "room:b/@x", "room b/01HX", "room:b/a b"):
        assert split_room_entry(bad) is None
    assert signer.verify_rooms(signer.rooms_suffix(["room:b/@x"])[1:]) is None


@pytest.mark.parametrize(
    "data",
    [{"text": "hi", "ts": 1}, 'a,"ts":1', [1, 2], None, 12345678901234567890123, "x" * 70000],
)
@pytest.mark.parametrize("sub", [None, 'bob,"ts":2'])
def test_event_frame_is_built_from_the_message_fields(data, sub):
    envelope = Envelope("01HXID", "room:1", data, 1700000000000, sub)
    frame, (start, end) = message_text_frame(envelope)
    entry = Entry("01HXID", 1, 1700000000000, frame, envelope.ts, envelope.sub, start, end)
    packet, frame = EventFrames("message", with_offset=True).build("room:1", entry)
    assert ws_payload(frame) == packet and entry.sio == (packet, frame)
    assert packet.startswith(b"42")
    meta = {"id": "01HXID", "channel": "room:1", "ts": 1700000000000}
    if sub is not None:
        meta["sub"] = sub
    assert loads(packet[2:]) == ["message", data, meta, "room:1/01HXID"]
    assert EventFrames("message", True).build("room:1", entry) is entry.sio  # cached
    varied, varied_frame = EventFrames.with_rooms(packet, b"~room:1,room:2~mac")
    assert ws_payload(varied_frame) == varied
    assert loads(varied[2:])[-1] == "room:1/01HXID~room:1,room:2~mac"
