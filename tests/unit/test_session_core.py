"""The session core of each kind (native websocket, socket.io over websocket and long-polling)
with a fake transport: flood, token expiry, refresh, limits and the send budget, through the
same parts a pod wires (hub, pump, access, registry), without processes or sockets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from devtools.waiting import eventually
from services.core.auth import Claims, mint_token
from services.core.broker import Delivery
from services.core.broker.memory import MemoryBroker
from services.core.channels import NamespaceLabeler
from services.core.closecodes import CloseCode
from services.core.envelope import Envelope
from services.socket.access import Access
from services.socket.delivery import NATIVE
from services.socket.history import History
from services.socket.http import Request
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.parts import SessionLimits, SessionParts
from services.socket.presence import Presence
from services.socket.pump import Pump
from services.socket.session import Session
from services.socket.sessions import SessionRegistry
from services.socket.settings import SocketSettings
from services.socket.socketio.engine import WsTransport
from services.socket.socketio.server import SocketIOServer
from services.socket.socketio.session import SioSession
from services.socket.tasks import TaskGroup

SECRET = "unit-test-secret-that-is-long-enough"
BUDGET = 1024


class FakeTransport:
    """An asyncio transport that keeps what is written; `unsent` plays the kernel's buffer."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.unsent = 0
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted


class Peer:
    """The client's end of a websocket over a FakeTransport: frames to send, frames received."""

    def __init__(self, transport: FakeTransport) -> None:
        self.protocol = ClientProtocol(parse_uri("ws://pod/ws"), state=State.OPEN)
        self.transport = transport
        self._read = 0

    def text(self, payload: bytes) -> bytes:
        self.protocol.send_text(payload)
        return b"".join(self.protocol.data_to_send())

    def received(self) -> list[Frame]:
        data = bytes(self.transport.data[self._read :])
        self._read = len(self.transport.data)
        self.protocol.receive_data(data)
        return [e for e in self.protocol.events_received() if isinstance(e, Frame)]


class Parts:
    """What a pod wires, for sessions of both kinds."""

    def __init__(self, **settings: Any) -> None:
        defaults: dict[str, Any] = {
            "broker": "memory",
            "token_secret": SECRET,
            "send_buffer_max_bytes": BUDGET,
            "client_frames_per_s": 5,
            "client_frames_burst": 20,
            "max_subscriptions_per_connection": 2,
            "close_timeout_s": 1,
        }
        self.settings = SocketSettings(**{**defaults, **settings})
        self.metrics = SocketMetrics()
        self.history = History(100, 60, 100, 0)
        self.history.stream_started(0)
        self.hub = Hub(self.history, self.metrics, recovery_wait_s=0)
        broker = MemoryBroker()
        self.presence = Presence("p", broker, 1, 10, 30, on_events=self.hub.presence_events)
        self.hub.presence = self.presence
        self.registry = SessionRegistry(10)
        self.access = Access(SECRET, ["*"], lambda: True, lambda: self.registry.full)
        self.tasks = TaskGroup()
        self.pump = Pump(
            None,  # type: ignore[arg-type]  # fed by hand below
            self.history,
            self.hub,
            self.metrics,
            NamespaceLabeler(frozenset({"room"})),
        )
        self.pump.live_from_ms = 0
        self.native = SessionParts(
            self.hub,
            self.presence,
            self.access,
            self.registry,
            self.metrics,
            SessionLimits.from_settings(self.settings),
            self.tasks.spawn,
        )
        self.sio = SocketIOServer(
            self.settings,
            self.hub,
            broker,
            self.access,
            self.registry,
            self.metrics,
            self.tasks.spawn,
        )
        self._ids = iter(range(1, 1_000_000))

    def publish(self, channel: str, data: object = "x") -> None:
        n = next(self._ids)
        envelope = Envelope(f"m{n:06d}", channel, data, int(time.time() * 1000))
        self.pump.handle(
            Delivery(
                data=envelope.encode(),
                attributes={"channel": channel},
                message_id=f"ps-{n}",
                publish_ms=envelope.ts,
            )
        )

    def native_session(self, claims: Claims | None) -> tuple[Session, FakeTransport, Peer]:
        transport = FakeTransport()
        session = Session(
            self.native,
            transport,  # type: ignore[arg-type]
            ServerProtocol(state=State.OPEN),
            claims,
        )
        self.registry.opened(session)
        return session, transport, Peer(transport)

    def sio_session(self, websocket: bool) -> tuple[SioSession, FakeTransport, Peer]:
        session = SioSession(self.sio.ctx, f"sid{len(self.registry)}", None)
        self.sio.sessions[session.sid] = session
        self.sio.ctx.opened(session)
        transport = FakeTransport()
        if websocket:
            ws = WsTransport(
                self.sio.ctx,
                transport,  # type: ignore[arg-type]
                ServerProtocol(state=State.OPEN),
                session,
                probing=False,
            )
            session.use_websocket(ws)
        return session, transport, Peer(transport)


def claims(sub: str = "ann", channels: tuple[str, ...] = ("room:*",), ttl_s: float = 600) -> Claims:
    return Claims(sub, channels, channels, int(time.time() + ttl_s))


def token(sub: str = "ann", channels: tuple[str, ...] = ("room:*",)) -> str:
    return mint_token(SECRET, sub, list(channels), list(channels), 600)[0]


def frames_json(frames: list[Frame]) -> list[dict[str, Any]]:
    return [orjson.loads(f.data) for f in frames if f.opcode is Opcode.TEXT]


def close_code(frames: list[Frame]) -> int | None:
    closes = [Close.parse(f.data).code for f in frames if f.opcode is Opcode.CLOSE]
    return closes[0] if closes else None


@pytest.fixture
def parts() -> Iterator[Parts]:
    yield Parts()


@pytest.fixture
def strict() -> Iterator[Parts]:
    """A burst of 3 client frames: floods come quickly."""
    yield Parts(client_frames_burst=3)


# -- native websocket ---------------------------------------------------------------------------
async def test_native_flood_warns_once_then_closes_1013(strict: Parts) -> None:
    parts = strict
    session, _, peer = parts.native_session(claims())
    for _ in range(10):
        session.feed(peer.text(b'{"type":"ping"}'))
    frames = peer.received()
    errors = [f for f in frames_json(frames) if f["type"] == "error"]
    assert [e["code"] for e in errors] == ["limit"]
    assert close_code(frames) == CloseCode.TRY_AGAIN_LATER
    assert parts.metrics.floods_closed._value.get() == 1


async def test_native_token_expiry_closes_1008_at_exp(parts: Parts) -> None:
    session, _, peer = parts.native_session(claims(ttl_s=0.3))
    frames: list[Frame] = []
    await eventually(
        lambda: close_code(frames.extend(peer.received()) or frames) is not None,
        5,
        "the close frame at the token's exp",
    )
    assert close_code(frames) == CloseCode.TOKEN_EXPIRED
    assert not session.open


async def test_native_refresh_keeps_the_sub_and_drops_what_the_new_token_forbids(
    parts: Parts,
) -> None:
    session, _, peer = parts.native_session(claims(channels=("room:*", "other:*")))
    session.feed(peer.text(b'{"type":"subscribe","channel":"room:1"}'))
    session.feed(peer.text(b'{"type":"subscribe","channel":"other:1"}'))
    peer.received()
    session.feed(peer.text(orjson.dumps({"type": "refresh", "token": token("bob")})))
    assert frames_json(peer.received())[-1]["code"] == "forbidden"
    session.feed(peer.text(orjson.dumps({"type": "refresh", "token": token("ann")})))
    replies = frames_json(peer.received())
    assert [r["type"] for r in replies] == ["unsubscribed", "refreshed"]
    assert replies[0]["channel"] == "other:1"
    assert parts.hub.session_count("other:1") == 0 and parts.hub.session_count("room:1") == 1


async def test_native_subscription_limit(parts: Parts) -> None:
    session, _, peer = parts.native_session(claims())
    for n in range(3):
        session.feed(peer.text(orjson.dumps({"type": "subscribe", "channel": f"room:{n}"})))
    replies = frames_json(peer.received())
    assert [r["type"] for r in replies] == ["subscribed", "subscribed", "error"]
    assert replies[-1]["code"] == "limit"


async def test_native_send_budget_closes_at_the_delivery_over_it(parts: Parts) -> None:
    session, transport, peer = parts.native_session(claims())
    session.feed(peer.text(b'{"type":"subscribe","channel":"room:1"}'))
    parts.publish("room:1")
    assert transport.data and not transport.closed
    transport.unsent = BUDGET + 1
    parts.publish("room:1")
    assert close_code(peer.received()) == CloseCode.TRY_AGAIN_LATER
    assert transport.closed and not session.open
    assert parts.metrics.slow_consumer_closes._value.get() == 1


async def test_native_send_budget_closes_a_reader_that_stalled_at_two_ticks(
    parts: Parts,
) -> None:
    session, transport, peer = parts.native_session(claims())
    transport.unsent = BUDGET + 1
    parts.registry.maintain(time.monotonic())
    assert session.open  # a burst may drain within a tick
    parts.registry.maintain(time.monotonic())
    assert close_code(peer.received()) == CloseCode.TRY_AGAIN_LATER and not session.open


# -- socket.io, both transports -----------------------------------------------------------------
def sio_packets(session: SioSession, transport: FakeTransport, peer: Peer) -> list[bytes]:
    """What the client got: websocket text frames, or the poll queue."""
    if session.ws is not None:
        return [f.data for f in peer.received() if f.opcode is Opcode.TEXT]
    packets, session.queue, session.queued_bytes = session.queue, [], 0
    return packets


def sio_send(session: SioSession, peer: Peer, packet: bytes) -> None:
    if session.ws is not None:
        session.ws.feed(peer.text(packet))
    else:  # a POST of the long-polling transport
        path = "/socket.io/"
        session.post(Request("POST", path, path, {}, "HTTP/1.1", {}, body=packet))


def acks(packets: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(p[p.index(b"[") :])[0] for p in packets if p.startswith(b"43")]


@pytest.fixture(params=["websocket", "polling"])
async def sio(
    parts: Parts, request: pytest.FixtureRequest
) -> tuple[SioSession, FakeTransport, Peer]:
    session, transport, peer = parts.sio_session(request.param == "websocket")
    sio_send(session, peer, b"40" + orjson.dumps({"token": token()}))
    assert any(p.startswith(b"40{") for p in sio_packets(session, transport, peer))
    return session, transport, peer


@pytest.mark.parametrize("websocket", [True, False])
async def test_sio_flood_answers_limit_then_closes(strict: Parts, websocket: bool) -> None:
    session, transport, peer = strict.sio_session(websocket)
    sio_send(session, peer, b"40" + orjson.dumps({"token": token()}))  # a packet of the burst
    for n in range(10):
        sio_send(session, peer, b"42" + str(n).encode() + b'["presence","room:1"]')
    codes = [a.get("code") for a in acks(sio_packets(session, transport, peer))]
    assert codes[:2] == [None, None] and set(codes[2:]) == {"limit"}  # each ack is answered
    assert not session.open
    assert strict.metrics.floods_closed._value.get() == 1


async def test_sio_token_expiry_ends_the_session(parts: Parts) -> None:
    session, transport, peer = parts.sio_session(websocket=True)
    expiring = mint_token(SECRET, "ann", ["room:*"], [], 1)[0]
    sio_send(session, peer, b"40" + orjson.dumps({"token": expiring}))
    await eventually(lambda: not session.open, 5, "the session's end at the token's exp")
    assert close_code(peer.received()) == CloseCode.TOKEN_EXPIRED


async def test_sio_refresh_keeps_the_sub(sio: tuple[SioSession, FakeTransport, Peer]) -> None:
    session, transport, peer = sio
    sio_send(session, peer, b"421" + orjson.dumps(["refresh", token("bob")]))
    sio_send(session, peer, b"422" + orjson.dumps(["refresh", token("ann")]))
    replies = acks(sio_packets(session, transport, peer))
    assert replies[0]["code"] == "forbidden" and replies[1]["ok"] is True


async def test_sio_room_limit(sio: tuple[SioSession, FakeTransport, Peer]) -> None:
    session, transport, peer = sio
    for n in range(3):
        sio_send(session, peer, b"42" + str(n).encode() + orjson.dumps(["join", f"room:{n}"]))
    replies = acks(sio_packets(session, transport, peer))
    assert [r["ok"] for r in replies] == [True, True, False] and replies[2]["code"] == "limit"


async def test_sio_send_budget(parts: Parts, sio: tuple[SioSession, FakeTransport, Peer]) -> None:
    session, transport, peer = sio
    sio_send(session, peer, b"421" + orjson.dumps(["join", "room:1"]))
    sio_packets(session, transport, peer)
    if session.ws is not None:
        transport.unsent = BUDGET + 1
        parts.publish("room:1")
    else:  # nobody polls: the queue grows past the budget
        for _ in range(BUDGET // 50 + 2):
            parts.publish("room:1", "y" * 50)
    assert not session.open
    assert parts.metrics.slow_consumer_closes._value.get() == 1
    assert parts.hub.session_count("room:1") == 0


# -- one hub for every kind ----------------------------------------------------------------------
async def test_every_kind_gets_its_framing_built_once_per_message(parts: Parts) -> None:
    parts.publish("room:1")  # the room's position is then this id for every joiner
    native, native_transport, native_peer = parts.native_session(claims())
    native.feed(native_peer.text(b'{"type":"subscribe","channel":"room:1"}'))
    native_peer.received()
    sios = [parts.sio_session(websocket=True) for _ in range(2)]
    polling = parts.sio_session(websocket=False)
    for session, transport, peer in [*sios, polling]:
        sio_send(session, peer, b"40" + orjson.dumps({"token": token(), "rooms": ["room:1"]}))
        sio_packets(session, transport, peer)
    assert native.framing is NATIVE
    assert sios[0][0].framing is sios[1][0].framing is not polling[0].framing
    before = [len(t.data) for _, t, _ in sios]
    parts.publish("room:1", {"n": 1})
    native_frame = frames_json(native_peer.received())
    assert native_frame[-1]["data"] == {"n": 1}
    sio_frames = [bytes(t.data[start:]) for (_, t, _), start in zip(sios, before, strict=True)]
    assert sio_frames[0] == sio_frames[1] and b'"message",{"n":1}' in sio_frames[0]
    assert polling[0].queue[-1].startswith(b'42["message",{"n":1}')
    assert parts.metrics.frames_sent._value.get() == 4
