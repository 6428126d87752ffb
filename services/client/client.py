"""The pubsock Python client: websockets (asyncio) for delivery, httpx for publishing.

The same recovery logic as the browser client (web/pubsock.js):

- it keeps the last position of every channel (a message `id`, or the `position` of a
  `subscribed` frame) and resubscribes with `since` after every reconnect;
- reconnects use exponential backoff with full jitter; 1012 reconnects at once (once: a second
  1012 before the new connection was stable backs off); 1013, network errors and refused
  handshakes back off; 1008, 401 and 403 fetch a new token first;
- `recovered: false` is reported as a `gap` (reload state), `recovered: true` as `recovered`;
- a subscription with a `rewind` (the channel's last messages, from the pod's history) sends it
  on every (re)subscribe: the server serves it on the first, and after a `gap` (then the handler
  gets the messages it had not seen yet), never when `since` recovers;
- a handler never sees a message id twice per channel (a bounded set of recent ids), and sees
  messages in the order the server sends them: one connection at a time, handlers awaited in turn;
- a token is refreshed (`refresh` frame) some margin before its `exp`.

Handlers and event callbacks may be plain functions or coroutine functions. Message handlers are
awaited before the next frame is read (that is what keeps the order); do not await
`subscribe()` or `presence()` inside a message handler (they wait for frames that handler holds
up): start a task instead. Coroutine event callbacks run as tasks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import random as _random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_ABNORMAL = 1006
CLOSE_TOKEN_EXPIRED = 1008
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013

EVENTS = frozenset(
    {
        "state",
        "pod",
        "recovered",
        "gap",
        "reconnecting",
        "error",
        "presence",
        "join",
        "leave",
        "refreshed",
        "subscribed",
        "unsubscribed",
    }
)

_CHANNEL_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")

Frame = dict[str, Any]
Handler = Callable[[Frame], Any]
TokenProvider = Callable[[], "str | Awaitable[str]"]


class PubsockError(Exception):
    """An `error` frame (or a local failure) that concerns one request."""

    def __init__(self, code: str, message: str, channel: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" ({channel})" if channel else ""))
        self.code = code
        self.message = message
        self.channel = channel


class PublishError(Exception):
    """A publish the API refused (4xx), or that still failed after every retry.

    `id` is the message id: retrying later with it still delivers the message once.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        detail: Any = None,
        id: str | list[str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.id = id
        self.retry_after_s = retry_after_s


def full_jitter(
    attempt: int, base_s: float, max_s: float, rand: Callable[[], float] = _random.random
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max_s, base_s * 2**attempt))."""
    cap = min(max_s, base_s * 2 ** min(attempt, 30))
    return float(rand() * cap)


def decode_jwt_payload(token: str | None) -> dict[str, Any] | None:
    """The payload of a JWT, not verified; None when malformed."""
    if not isinstance(token, str):
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def token_expiry(token: str | None) -> float | None:
    """The `exp` claim of a JWT (unix seconds), or None."""
    payload = decode_jwt_payload(token)
    exp = payload.get("exp") if payload else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


@dataclass(slots=True)
class _Subscription:
    channel: str
    handler: Handler
    presence: bool
    position: str | None
    rewind: dict[str, int] | None = None
    sent_since: str | None = None
    pending_position: str | None = None
    active: bool = False
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    waiters: list[asyncio.Future[Frame]] = field(default_factory=list)


def _fail(futures: Iterable[asyncio.Future[Any]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody awaits it


def _http_base(ws_url: str) -> str:
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class PubsockClient:
    """A pubsock connection that resumes by itself.

    ```
    async with PubsockClient("ws://host/ws", token=t, token_provider=fetch_token) as client:
        await client.subscribe("room:1", handler, presence=True)
        await client.publish("room:1", {"text": "hi"})
    ```
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        api_base: str | None = None,
        api_key: str | None = None,
        warmup_url: str | None = None,
        warmup: bool = True,
        http_client: httpx.AsyncClient | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        refresh_margin_s: float = 60.0,
        min_refresh_interval_s: float = 1.0,
        stable_after_s: float = 5.0,
        dedupe_size: int = 1000,
        publish_retries: int = 5,
        presence_timeout_s: float = 5.0,
        open_timeout_s: float = 10.0,
        first_connect_timeout_s: float = 30.0,
        token_refetch_after_failures: int = 3,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        connect_kwargs: Mapping[str, Any] | None = None,
        random: Callable[[], float] = _random.random,
        on_state: Callable[[Frame], Any] | None = None,
        on_pod: Callable[[Frame], Any] | None = None,
        on_recovered: Callable[[Frame], Any] | None = None,
        on_gap: Callable[[Frame], Any] | None = None,
        on_reconnecting: Callable[[Frame], Any] | None = None,
        on_error: Callable[[Frame], Any] | None = None,
        on_presence: Callable[[Frame], Any] | None = None,
        on_join: Callable[[Frame], Any] | None = None,
        on_leave: Callable[[Frame], Any] | None = None,
        on_refreshed: Callable[[Frame], Any] | None = None,
    ) -> None:
        self.url = url
        self.api_base = (api_base if api_base else _http_base(url)).rstrip("/")
        self.api_key = api_key
        self.warmup_url = (warmup_url or f"{_http_base(url)}/config.json") if warmup else None
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.refresh_margin_s = refresh_margin_s
        self.min_refresh_interval_s = min_refresh_interval_s
        self.stable_after_s = stable_after_s
        self.dedupe_size = dedupe_size
        self.publish_retries = publish_retries
        self.presence_timeout_s = presence_timeout_s
        self.open_timeout_s = open_timeout_s
        self.first_connect_timeout_s = first_connect_timeout_s
        self.token_refetch_after_failures = token_refetch_after_failures
        self._connect_kwargs = {
            "ping_interval": ping_interval_s,
            "ping_timeout": ping_timeout_s,
            **(connect_kwargs or {}),
        }
        self._random = random
        self._token_provider = token_provider
        self._token: str | None = None
        self._token_exp: float | None = None
        self._set_token(token)
        self._force_token = False
        self._pending_refresh: str | None = None
        self._refresh_answer: asyncio.Future[bool] | None = None

        self._http = http_client
        self._own_http = http_client is None
        self._listeners: dict[str, list[Callable[[Frame], Any]]] = {name: [] for name in EVENTS}
        callbacks = {
            "state": on_state,
            "pod": on_pod,
            "recovered": on_recovered,
            "gap": on_gap,
            "reconnecting": on_reconnecting,
            "error": on_error,
            "presence": on_presence,
            "join": on_join,
            "leave": on_leave,
            "refreshed": on_refreshed,
        }
        for name, callback in callbacks.items():
            if callback is not None:
                self.on(name, callback)
        self._tasks: set[asyncio.Task[Any]] = set()

        self._subs: dict[str, _Subscription] = {}
        self._pending_unsubscribes: dict[str, int] = {}
        self._presence_waiters: dict[str, list[asyncio.Future[Frame]]] = {}
        self._ws: ClientConnection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()
        self._closing = False
        self._state = "closed"
        self._pod: str | None = None
        self._pod_announced = False
        self._attempt = 0
        self._fast_reconnects = 0
        self._handshake_failures = 0

    # -- public API ----------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """ "connecting", "open" or "closed"."""
        return self._state

    @property
    def pod(self) -> str | None:
        return self._pod

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def channels(self) -> list[str]:
        return list(self._subs)

    def position(self, channel: str) -> str | None:
        """The last position seen on `channel`: what the next resubscribe sends as `since`."""
        sub = self._subs.get(channel)
        return sub.position if sub else None

    def on(self, event: str, callback: Callable[[Frame], Any]) -> Callable[[], None]:
        """Calls `callback(detail)` on `event`; returns a function that stops it."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; one of {sorted(EVENTS)}")
        self._listeners[event].append(callback)
        return lambda: self._listeners[event].remove(callback)

    async def __aenter__(self) -> PubsockClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self, timeout_s: float | None = None) -> None:
        """Starts (re)connecting until close(); returns once the first connection is open.

        Raises TimeoutError (and stops) when no connection opens within the timeout.
        """
        self._closing = False
        if self._runner is None or self._runner.done():
            self._attempt = self._fast_reconnects = self._handshake_failures = 0
            self._runner = asyncio.get_running_loop().create_task(self._run())
        try:
            async with asyncio.timeout(timeout_s or self.first_connect_timeout_s):
                await self._opened.wait()
        except TimeoutError:
            await self.close()
            raise TimeoutError(f"no connection to {self.url}") from None

    async def close(self) -> None:
        """Closes for good (no reconnect). Subscriptions stay registered for a later connect()."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(CLOSE_NORMAL)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._state != "closed":  # cancelled mid-attempt: nothing else will say so
            self._set_state("closed", code=CLOSE_NORMAL, reason="closed by the client")
        for task in list(self._tasks):
            task.cancel()
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def subscribe(
        self,
        channel: str,
        handler: Handler,
        *,
        since: str | None = None,
        presence: bool = False,
        rewind: Mapping[str, int] | None = None,
        timeout_s: float | None = 10.0,
    ) -> Frame:
        """Subscribes `handler(message_frame)` (replacing an earlier handler of the channel).

        `rewind` (`{"count": N}` and/or `{"seconds": T}`): the handler first gets the channel's
        recent messages from the pod's history, then live ones; the frame's `rewound` says how
        many and whether they are `complete`. It is asked again with every resubscribe, and
        served only where `since` cannot recover (after a `gap`).

        Returns the `subscribed` frame. Raises PubsockError when the server refuses (the
        subscription is then dropped), TimeoutError when no answer came in `timeout` (the
        subscription stays and is sent again on every reconnect).
        """
        sub = self._subs.get(channel)
        resend = (
            sub is None or sub.presence != presence or (since is not None and since != sub.position)
        )
        if sub is None:
            sub = self._subs[channel] = _Subscription(channel, handler, presence, since)
        else:
            sub.handler = handler
            sub.presence = presence
            if since is not None:
                sub.position = since
        # For the next (re)subscribe; a subscription already running keeps what it has.
        sub.rewind = dict(rewind) if rewind is not None else None
        if not resend and sub.active:
            return {"type": "subscribed", "channel": channel, "position": sub.position}
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        sub.waiters.append(future)
        if resend and self._is_open():
            await self._send_subscribe(sub)
            if sub.sent_since or sub.rewind:
                await self._send({"type": "ping"})  # its pong marks the end of the replay
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(future)
        finally:
            if future in sub.waiters:
                sub.waiters.remove(future)

    async def unsubscribe(self, channel: str) -> None:
        sub = self._subs.pop(channel, None)
        if sub is None:
            return
        _fail(sub.waiters, PubsockError("unsubscribed", "unsubscribed", channel))
        if self._is_open() and await self._send({"type": "unsubscribe", "channel": channel}):
            self._pending_unsubscribes[channel] = self._pending_unsubscribes.get(channel, 0) + 1

    async def presence(self, channel: str, timeout_s: float | None = None) -> Frame:
        """Who is on `channel` now, on every pod: the `presence` frame (count, members)."""
        if not self._is_open():
            raise PubsockError("not_connected", "not connected", channel)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._presence_waiters.setdefault(channel, []).append(future)
        try:
            await self._send({"type": "presence", "channel": channel})
            async with asyncio.timeout(timeout_s or self.presence_timeout_s):
                return await future
        finally:
            waiters = self._presence_waiters.get(channel)
            if waiters and future in waiters:
                waiters.remove(future)

    async def set_token(self, token: str) -> None:
        """A new token from the application: sent as `refresh` when connected."""
        if self._is_open() and token != self._token:
            self._pending_refresh = token
            await self._send({"type": "refresh", "token": token})
        else:
            self._set_token(token)

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        id: str | None = None,
        retries: int | None = None,
    ) -> Frame:
        """POSTs one message; returns `{"id", "channel"}` once the API answered 202.

        5xx answers and network errors are retried with the same id (delivered once), after
        Retry-After or a full-jitter backoff; a 401 fetches a new token once; other 4xx raise
        PublishError.
        """
        message_id = id or str(uuid.uuid4())
        path = channel if _CHANNEL_RE.match(channel) else quote(channel, safe="")
        url = f"{self.api_base}/v1/channels/{path}/messages"

        def body(previous: Any) -> dict[str, Any]:
            nonlocal message_id
            if isinstance(previous, dict) and isinstance(previous.get("id"), str):
                message_id = previous["id"]  # a 503 names the id to retry with
            return {"data": data, "id": message_id}

        result = await self._post(url, body, retries, lambda: message_id)
        return {"id": result.get("id", message_id), "channel": result.get("channel", channel)}

    async def publish_batch(
        self, messages: Iterable[Mapping[str, Any]], *, retries: int | None = None
    ) -> list[str]:
        """POSTs `/v1/messages`; every message without an id gets one here, so a retry is safe."""
        items = [
            {"channel": m["channel"], "data": m.get("data"), "id": m.get("id") or str(uuid.uuid4())}
            for m in messages
        ]

        def body(previous: Any) -> dict[str, Any]:
            ids = previous.get("ids") if isinstance(previous, dict) else None
            if isinstance(ids, list) and len(ids) == len(items):
                for item, message_id in zip(items, ids, strict=True):
                    item["id"] = message_id
            return {"messages": items}

        result = await self._post(
            f"{self.api_base}/v1/messages", body, retries, lambda: [m["id"] for m in items]
        )
        ids = result.get("ids")
        return ids if isinstance(ids, list) else [m["id"] for m in items]

    # -- HTTP ----------------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=15.0)
            self._own_http = True
        return self._http

    async def _post(
        self,
        url: str,
        make_body: Callable[[Any], dict[str, Any]],
        retries: int | None,
        current_id: Callable[[], Any],
    ) -> dict[str, Any]:
        retries = self.publish_retries if retries is None else retries
        refetched = False
        previous: Any = None
        attempt = 0
        while True:
            headers = {}
            credential = self.api_key or await self._token_for_http()
            if credential:
                headers["Authorization"] = f"Bearer {credential}"
            try:
                response = await self._client().post(url, json=make_body(previous), headers=headers)
            except httpx.TransportError as exc:
                if attempt >= retries:
                    raise PublishError(f"publish failed: {exc!r}", id=current_id()) from exc
                await asyncio.sleep(self._jitter(attempt))
                attempt += 1
                continue
            try:
                previous = response.json()
            except ValueError:
                previous = None
            if 200 <= response.status_code < 300:
                return previous if isinstance(previous, dict) else {}
            make_body(previous)  # adopt the ids a 503 names
            retry_after = _retry_after(response)
            if (
                response.status_code == 401
                and self._token_provider is not None
                and not self.api_key
                and not refetched
            ):
                refetched = True
                self._set_token(await self._call_provider())
                continue
            if response.status_code >= 500 and attempt < retries:
                delay = max(retry_after or 0.0, self._jitter(attempt))
                await asyncio.sleep(min(delay, self.backoff_max_s))
                attempt += 1
                continue
            detail = previous.get("detail") if isinstance(previous, dict) else None
            raise PublishError(
                f"publish failed: {response.status_code} {detail if detail is not None else ''}",
                status=response.status_code,
                detail=detail,
                id=current_id(),
                retry_after_s=retry_after,
            )

    async def _token_for_http(self) -> str | None:
        if self._token_provider is not None and self._token_needs_refresh():
            try:
                self._set_token(await self._call_provider())
                self._force_token = False
            except Exception:  # use what we have: the API answers 401 if it is not good
                log.warning("token provider failed", exc_info=True)
        return self._token

    async def _warm_up(self) -> dict[str, str]:
        """A plain GET first, so a load balancer sets its affinity cookie before the upgrade."""
        if not self.warmup_url:
            return {}
        client = self._client()
        try:
            response = await client.get(self.warmup_url, timeout=5.0)
        except httpx.HTTPError:
            return {}
        pod = response.headers.get("X-Pubsock-Pod")
        if pod and not self._pod_announced:
            self._set_pod(pod, "http")
        request = httpx.Request("GET", self.warmup_url)
        client.cookies.set_cookie_header(request)
        cookie = request.headers.get("Cookie")
        return {"Cookie": cookie} if cookie else {}

    # -- connection lifecycle ------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            opened_at: float | None = None
            try:
                code, reason, opened_at = await self._connect_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a callback must not end the client
                log.exception("pubsock client connection failed")
                self._emit("error", {"code": "client", "message": repr(exc)})
                code, reason = CLOSE_ABNORMAL, repr(exc)
            if self._closing:
                break
            if opened_at is not None and loop.time() - opened_at >= self.stable_after_s:
                self._attempt = 0
                self._fast_reconnects = 0
            delay = self._next_delay(code)
            self._emit(
                "reconnecting",
                {"code": code, "reason": reason, "delay": delay, "attempt": self._attempt},
            )
            await asyncio.sleep(delay)

    def _next_delay(self, code: int) -> float:
        if code == CLOSE_TOKEN_EXPIRED:
            self._force_token = True
        if code == CLOSE_RESTART and self._fast_reconnects < 1:
            self._fast_reconnects += 1
            return 0.0
        delay = self._jitter(self._attempt)
        self._attempt += 1
        return delay

    def _jitter(self, attempt: int) -> float:
        return full_jitter(attempt, self.backoff_base_s, self.backoff_max_s, self._random)

    async def _connect_once(self) -> tuple[int, str, float | None]:
        self._set_state("connecting")
        if self._token_provider is not None and self._token_needs_refresh():
            try:
                self._set_token(await self._call_provider())
                self._force_token = False
            except Exception as exc:
                self._emit("error", {"code": "token", "message": f"token provider failed: {exc!r}"})
                self._set_state("closed", code=CLOSE_ABNORMAL, reason="no token")
                return CLOSE_ABNORMAL, "no token", None
        headers = await self._warm_up()
        url = self.url
        if self._token:
            url += ("&" if "?" in url else "?") + urlencode({"token": self._token})
        try:
            ws = await connect(
                url,
                additional_headers=headers or None,
                open_timeout=self.open_timeout_s,
                **self._connect_kwargs,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            self._handshake_failed(force_token=status in (401, 403))
            reason = f"handshake refused: HTTP {status}"
            self._set_state("closed", code=CLOSE_ABNORMAL, reason=reason)
            return CLOSE_ABNORMAL, reason, None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._handshake_failed(force_token=False)
            reason = f"cannot connect: {exc!r}"
            self._set_state("closed", code=CLOSE_ABNORMAL, reason=reason)
            return CLOSE_ABNORMAL, reason, None
        opened_at = asyncio.get_running_loop().time()
        self._ws = ws
        self._handshake_failures = 0
        self._pod_announced = False
        refresher = asyncio.get_running_loop().create_task(self._refresh_loop(ws))
        try:
            self._opened.set()
            self._set_state("open")
            for sub in list(self._subs.values()):
                await self._send_subscribe(sub)
            await self._send({"type": "ping"})  # names the pod; its pong ends every replay
            async for raw in ws:
                await self._on_data(raw)
        except websockets.ConnectionClosed:
            pass
        finally:
            refresher.cancel()
            self._connection_ended()
            if ws.close_code is None:  # left by an exception or a cancellation: close it
                self._spawn(ws.close())
        code = ws.close_code if ws.close_code is not None else CLOSE_ABNORMAL
        reason = ws.close_reason or ""
        self._set_state("closed", code=code, reason=reason)
        return code, reason, opened_at

    def _handshake_failed(self, *, force_token: bool) -> None:
        self._handshake_failures += 1
        if force_token or self._handshake_failures >= self.token_refetch_after_failures:
            self._force_token = True

    def _connection_ended(self) -> None:
        self._ws = None
        self._opened.clear()
        for sub in self._subs.values():
            sub.active = False
            sub.pending_position = None  # the replay may be incomplete: keep `since`
        self._pending_unsubscribes.clear()
        if self._pending_refresh:
            self._set_token(self._pending_refresh)  # fresher than the old one, never refused
            self._pending_refresh = None
        if self._refresh_answer is not None and not self._refresh_answer.done():
            self._refresh_answer.set_result(False)
        for channel, waiters in self._presence_waiters.items():
            _fail(waiters, PubsockError("not_connected", "connection lost", channel))
        self._presence_waiters.clear()

    # -- tokens --------------------------------------------------------------------------------
    def _set_token(self, token: str | None) -> None:
        self._token = token or None
        self._token_exp = token_expiry(self._token)

    def _token_needs_refresh(self) -> bool:
        if not self._token or self._force_token:
            return True
        return (
            self._token_exp is not None and self._token_exp - time.time() <= self.refresh_margin_s
        )

    async def _call_provider(self) -> str:
        assert self._token_provider is not None
        result = self._token_provider()
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str) or not result:
            raise PubsockError("token", "token provider returned no token")
        return result

    async def _refresh_loop(self, ws: ClientConnection) -> None:
        """Sends `refresh` a margin before expiry (half the remaining life for short tokens)."""
        while self._token_provider is not None and self._ws is ws:
            exp = self._token_exp
            if exp is None:
                return
            remaining = exp - time.time()
            if remaining <= self.min_refresh_interval_s:
                return  # too late: the server closes with 1008 and we reconnect
            margin = self.refresh_margin_s
            delay = remaining - margin if remaining > 2 * margin else remaining / 2
            await asyncio.sleep(max(self.min_refresh_interval_s, delay))
            try:
                token = await self._call_provider()
            except Exception as exc:
                self._emit("error", {"code": "token", "message": f"token provider failed: {exc!r}"})
                continue
            if token == self._token:
                return
            if self._ws is not ws:
                self._set_token(token)
                return
            answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._refresh_answer = answer
            self._pending_refresh = token
            await self._send({"type": "refresh", "token": token})
            if not await answer:
                return  # refused: the old token stays until it expires (then 1008)

    # -- frames --------------------------------------------------------------------------------
    def _is_open(self) -> bool:
        return self._ws is not None and self._opened.is_set()

    async def _send(self, frame: Frame) -> bool:
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(frame, separators=(",", ":")))
        except websockets.ConnectionClosed:
            return False
        return True

    async def _send_subscribe(self, sub: _Subscription) -> None:
        frame: Frame = {"type": "subscribe", "channel": sub.channel}
        if sub.position:
            frame["since"] = sub.position
        if sub.presence:
            frame["presence"] = True
        if sub.rewind:
            frame["rewind"] = sub.rewind
        sub.sent_since = sub.position
        sub.active = False
        sub.pending_position = None
        await self._send(frame)

    async def _on_data(self, raw: str | bytes) -> None:
        try:
            frame = json.loads(raw)
        except ValueError:
            self._emit("error", {"code": "bad_frame", "message": "frame is not JSON"})
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind == "message":
            await self._on_message(frame)
        elif kind == "subscribed":
            self._on_subscribed(frame)
        elif kind == "unsubscribed":
            self._on_unsubscribed(frame)
        elif kind == "pong":
            self._on_pong(frame)
        elif kind == "refreshed":
            self._on_refreshed(frame)
        elif kind == "presence":
            waiters = self._presence_waiters.pop(str(frame.get("channel")), [])
            for future in waiters:
                if not future.done():
                    future.set_result(frame)
            self._emit("presence", frame)
        elif kind in ("join", "leave"):
            if frame.get("channel") in self._subs:
                self._emit(kind, frame)
        elif kind == "error":
            self._on_error_frame(frame)

    async def _on_message(self, frame: Frame) -> None:
        sub = self._subs.get(frame.get("channel"))  # type: ignore[arg-type]
        if sub is None or not sub.active:
            return  # not (yet) subscribed on this connection
        message_id = frame.get("id")
        if isinstance(message_id, str):
            if message_id in sub.seen:
                return  # a duplicate: already delivered
            sub.seen[message_id] = None
            if len(sub.seen) > self.dedupe_size:
                sub.seen.popitem(last=False)
            sub.position = message_id
            sub.pending_position = None
        try:
            result = sub.handler(frame)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            log.exception("pubsock message handler failed")
            self._emit("error", {"code": "handler", "message": repr(exc), "channel": sub.channel})

    def _on_subscribed(self, frame: Frame) -> None:
        sub = self._subs.get(frame.get("channel"))  # type: ignore[arg-type]
        if sub is None:
            return
        sub.active = True
        detail = {
            "channel": sub.channel,
            "since": sub.sent_since,
            "position": frame.get("position"),
        }
        recovered = frame.get("recovered")
        rewound = frame.get("rewound")
        # A rewind's messages follow: like a replay, the frame's position is adopted only once
        # they are in (a message or the next pong), so a connection lost before asks again.
        rewinding = isinstance(rewound, dict) and bool(rewound.get("count"))
        if recovered is False:
            if rewinding:
                sub.pending_position = frame.get("position")
            else:
                sub.position = frame.get("position") or sub.position
            self._emit("gap", detail)
        elif recovered is True:
            # The replay follows; keep `since` until a message or the next pong proves where we are.
            sub.pending_position = frame.get("position")
            self._emit("recovered", detail)
        elif rewinding:
            sub.pending_position = frame.get("position")
        elif frame.get("position"):
            sub.position = frame["position"]
        self._emit("subscribed", frame)
        for future in sub.waiters:
            if not future.done():
                future.set_result(frame)
        sub.waiters.clear()

    def _on_unsubscribed(self, frame: Frame) -> None:
        channel = frame.get("channel")
        pending = self._pending_unsubscribes.get(channel, 0)  # type: ignore[arg-type]
        if pending:
            if pending == 1:
                del self._pending_unsubscribes[channel]  # type: ignore[arg-type]
            else:
                self._pending_unsubscribes[channel] = pending - 1  # type: ignore[index]
            return
        sub = self._subs.pop(channel, None)  # type: ignore[arg-type]
        if sub is not None:
            _fail(sub.waiters, PubsockError("unsubscribed", "unsubscribed by the server", channel))
        self._emit("unsubscribed", {"channel": channel, "by_server": True})

    def _on_pong(self, frame: Frame) -> None:
        for sub in self._subs.values():
            if sub.active and sub.pending_position:
                sub.position = sub.pending_position
                sub.pending_position = None
        pod = frame.get("pod")
        if pod and (pod != self._pod or not self._pod_announced):
            self._set_pod(pod, "ws")
        self._pod_announced = True

    def _on_refreshed(self, frame: Frame) -> None:
        if self._pending_refresh:
            self._set_token(self._pending_refresh)
            self._pending_refresh = None
        expires_at = frame.get("expires_at")
        if isinstance(expires_at, int | float):
            self._token_exp = float(expires_at)
        if self._refresh_answer is not None and not self._refresh_answer.done():
            self._refresh_answer.set_result(True)
        self._emit("refreshed", {"expires_at": expires_at})

    def _on_error_frame(self, frame: Frame) -> None:
        code = str(frame.get("code"))
        message = str(frame.get("message", ""))
        channel = frame.get("channel")
        if channel:
            sub = self._subs.get(channel)
            if sub is not None and not sub.active:
                del self._subs[channel]  # refused: every reconnect would ask again
                _fail(sub.waiters, PubsockError(code, message, channel))
            if code in ("forbidden", "bad_channel"):
                _fail(self._presence_waiters.pop(channel, []), PubsockError(code, message, channel))
        elif code == "forbidden" and self._pending_refresh:
            self._pending_refresh = None
            if self._refresh_answer is not None and not self._refresh_answer.done():
                self._refresh_answer.set_result(False)
        self._emit("error", dict(frame))

    # -- helpers -------------------------------------------------------------------------------
    def _set_pod(self, pod: str, via: str) -> None:
        self._pod = pod
        self._emit("pod", {"pod": pod, "via": via})

    def _set_state(self, state: str, **extra: Any) -> None:
        self._state = state
        self._emit("state", {"state": state, **extra})

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(self, event: str, detail: Frame) -> None:
        for callback in list(self._listeners[event]):
            try:
                result = callback(detail)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:
                log.exception("pubsock %s callback failed", event)
