"""The client protocol parser and the server frames (shared by every pod)."""

from __future__ import annotations

import orjson
import pytest

from services.core.envelope import Envelope, InvalidEnvelope, decode_envelope
from services.core.ids import id_time_ms, is_valid_message_id, new_message_id
from services.core.protocol import (
    Ping,
    PresenceQuery,
    ProtocolError,
    Refresh,
    RewindSpec,
    Subscribe,
    Unsubscribe,
    message_frame,
    parse_client_frame,
    subscribed_frame,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"type":"subscribe","channel":"room:1"}', Subscribe("room:1")),
        (
            '{"type":"subscribe","channel":"a@b.c-d_e","since":"01X","presence":true}',
            Subscribe("a@b.c-d_e", "01X", True),
        ),
        (
            '{"type":"subscribe","channel":"c","rewind":{"count":50}}',
            Subscribe("c", rewind=RewindSpec(count=50)),
        ),
        (
            '{"type":"subscribe","channel":"c","since":"x","rewind":{"seconds":60,"count":5}}',
            Subscribe("c", "x", rewind=RewindSpec(5, 60)),
        ),
        ('{"type":"subscribe","channel":"c","rewind":null}', Subscribe("c")),
        ('{"type":"unsubscribe","channel":"room:1"}', Unsubscribe("room:1")),
        ('{"type":"ping"}', Ping()),
        ('{"type":"refresh","token":"t"}', Refresh("t")),
        ('{"type":"presence","channel":"c"}', PresenceQuery("c")),
    ],
)
def test_parses_every_client_frame(raw, expected):
    assert parse_client_frame(raw) == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", "bad_request"),
        ("nope", "bad_request"),
        ("[]", "bad_request"),
        ("null", "bad_request"),
        ('{"channel":"c"}', "bad_request"),
        ('{"type":"fly"}', "bad_request"),
        ('{"type":1}', "bad_request"),
        ('{"type":"subscribe"}', "bad_request"),
        ('{"type":"subscribe","channel":""}', "bad_channel"),
        ('{"type":"subscribe","channel":"a b"}', "bad_channel"),
        ('{"type":"subscribe","channel":"a\\n"}', "bad_channel"),
        ('{"type":"subscribe","channel":["x"]}', "bad_channel"),
        ('{"type":"subscribe","channel":"' + "c" * 129 + '"}', "bad_channel"),
        ('{"type":"subscribe","channel":"c","since":""}', "bad_request"),
        ('{"type":"subscribe","channel":"c","since":7}', "bad_request"),
        ('{"type":"subscribe","channel":"c","presence":1}', "bad_request"),
        ('{"type":"refresh"}', "bad_request"),
        ('{"type":"refresh","token":""}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":{}}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":50}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":[50]}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":{"count":0}}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":{"count":-1}}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":{"count":1.5}}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":{"count":"5"}}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":{"count":true}}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":{"seconds":null}}', "bad_request"),
        ('{"type":"subscribe","channel":"c","rewind":{"count":5,"from":"x"}}', "bad_request"),
    ],
)
def test_rejects_bad_frames_with_the_contract_code(raw, code):
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(raw)
    assert info.value.code == code


def test_a_bad_rewind_names_the_channel():
    with pytest.raises(ProtocolError) as info:
        parse_client_frame('{"type":"subscribe","channel":"room:1","rewind":{"count":0}}')
    assert info.value.channel == "room:1" and "count" in str(info.value)


@pytest.mark.parametrize(
    ("spec", "limited"),
    [
        (RewindSpec(count=100), False),
        (RewindSpec(count=101), True),
        (RewindSpec(seconds=60), False),
        (RewindSpec(seconds=61), True),
        (RewindSpec(100, 60), False),
        (RewindSpec(1, 61), True),
    ],
)
def test_rewind_limits_are_a_limit_error(spec, limited):
    if not limited:
        served = spec.within_limits(100, 60.0, "c")
        assert served.seconds == spec.seconds
        assert served.count == (spec.count if spec.count is not None else 100)
        return
    with pytest.raises(ProtocolError) as info:
        spec.within_limits(100, 60.0, "c")
    assert info.value.code == "limit" and info.value.channel == "c"


def test_seconds_alone_are_served_as_the_last_max_count_of_them():
    assert RewindSpec(seconds=30).within_limits(100, 60.0) == RewindSpec(100, 30)
    assert RewindSpec(count=7).within_limits(100, 60.0) == RewindSpec(7)


def test_message_frame_carries_the_contract_fields():
    frame = orjson.loads(message_frame(Envelope("id1", "room:1", {"x": [1]}, 5, "ann")))
    assert frame == {
        "type": "message", "channel": "room:1", "id": "id1", "data": {"x": [1]}, "ts": 5, "sub": "ann"
    }  # fmt: skip
    assert "sub" not in orjson.loads(message_frame(Envelope("i", "c", None, 1)))


def test_subscribed_frame_has_recovered_only_when_asked():
    assert "recovered" not in orjson.loads(subscribed_frame("c", "@1", None))
    assert orjson.loads(subscribed_frame("c", "@1", False))["recovered"] is False
    assert "rewound" not in orjson.loads(subscribed_frame("c", "@1", None))
    rewound = orjson.loads(subscribed_frame("c", "x", False, (3, False)))
    assert rewound["rewound"] == {"count": 3, "complete": False} and rewound["recovered"] is False


def test_ids_are_time_ordered_and_valid():
    first, second = new_message_id(), new_message_id()
    assert is_valid_message_id(first) and len(first) == 26
    assert id_time_ms(first) is not None and id_time_ms(first) <= id_time_ms(second)
    assert id_time_ms("0190b2c8-1f4e-7a3b-8c3d-0123456789ab") == 0x0190B2C81F4E
    assert id_time_ms("12345") is None
    assert not is_valid_message_id("a b") and not is_valid_message_id("x" * 129)


def test_envelope_round_trip_and_fallbacks():
    envelope = Envelope("id-1", "room:1", {"k": "v"}, 123, "sub-1")
    assert decode_envelope(envelope.encode(), envelope.attributes(), "pid", 9) == envelope
    bare = decode_envelope(b'{"data": 1}', {"channel": "c"}, "pubsub-id", 77)
    assert (bare.id, bare.ts, bare.channel) == ("pubsub-id", 77, "c")


@pytest.mark.parametrize(
    "body",
    [b"nope", b"[1]", b'{"data":1}', b'{"channel":"a b"}', b'{"channel":"c","id":"a b"}',
     b'{"channel":"c","ts":"x"}', b'{"channel":"c","ts":true}', b'{"channel":"c","sub":1}'],
)  # fmt: skip
def test_unreadable_envelopes_are_refused(body):
    with pytest.raises(InvalidEnvelope):
        decode_envelope(body, {}, "pid", 1)


def test_any_json_value_survives_the_round_trip():
    """Integers beyond 64 bits and lone surrogates: orjson refuses them, the fallback does not."""
    for data in (10**30, -(10**25), "\ud800 lone", {"deep": [[[[1]]]]}):
        envelope = Envelope("i", "c", data, 1)
        decoded = decode_envelope(envelope.encode(), {}, "p", 1)
        assert decoded.data == data
        from services.core.envelope import loads

        assert loads(message_frame(decoded))["data"] == data


@pytest.mark.parametrize(
    "data", [{"text": "hi", "ts": 1}, 'a,"ts":1', [1, 2], None, 12345678901234567890123, "é"]
)
@pytest.mark.parametrize("sub", [None, 'bob,"ts":2'])
def test_the_message_frame_is_built_from_fields_and_says_where_its_data_is(data, sub):
    from services.core.envelope import Envelope, dumps
    from services.core.protocol import message_frame_parts

    envelope = Envelope("01HXID", "room:1", data, 1700000000000, sub)
    payload, start, end = message_frame_parts(envelope)
    expected = {"type": "message", "channel": "room:1", "id": "01HXID", "data": data}
    expected["ts"] = 1700000000000
    if sub is not None:
        expected["sub"] = sub
    assert payload == dumps(expected)  # the wire as before, key order included
    assert payload[start:end] == dumps(data)
