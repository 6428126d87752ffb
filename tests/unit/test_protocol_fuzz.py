"""Property-based tests of the client protocol parser: no input escapes as anything but a
parsed frame or a ProtocolError with a contract code."""

from __future__ import annotations

import contextlib

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.protocol import ClientFrame, ProtocolError, parse_client_frame

CODES = {"bad_request", "bad_channel"}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "ping", "refresh", "presence", "x", 1])},
    optional={
        "channel": st.one_of(st.text(max_size=140), json_values),
        "since": st.one_of(st.text(max_size=140), json_values),
        "presence": json_values,
        "token": json_values,
        "rewind": st.one_of(
            st.fixed_dictionaries(
                {}, optional={"count": json_values, "seconds": json_values, "x": json_values}
            ),
            json_values,
        ),
    },
)
EXAMPLES = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(raw: bytes | str) -> None:
    try:
        frame = parse_client_frame(raw)
    except ProtocolError as error:
        assert error.code in CODES and str(error)
    else:
        assert isinstance(frame, ClientFrame)


@EXAMPLES
@given(st.binary(max_size=300))
def test_arbitrary_bytes(raw):
    check(raw)


@EXAMPLES
@given(json_values)
def test_arbitrary_json(value):
    check(orjson.dumps(value))


@EXAMPLES
@given(frame_like)
def test_frame_shaped_objects(value):
    check(orjson.dumps(value))
    frame = None
    with contextlib.suppress(ProtocolError):
        frame = parse_client_frame(orjson.dumps(value))
    if frame is not None and hasattr(frame, "channel"):
        assert 1 <= len(frame.channel) <= 128
    rewind = getattr(frame, "rewind", None)
    if rewind is not None:  # only positive integers get through, at least one of the two
        bounds = [b for b in (rewind.count, rewind.seconds) if b is not None]
        assert bounds and all(type(b) is int and b > 0 for b in bounds)
