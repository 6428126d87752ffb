"""Every open session of a pod, whatever its kind: the one admission count, maintenance loop and
drain.

Native websockets, socket.io sessions (websocket or long-polling) and any later kind register
here when they open and leave when they end; the pod's capacity counts them all, the pod's one
maintenance loop looks after them all (`maintain`), and a drain closes them all, spread over a
window so that clients do not all come back at once. (socket.io's own protocol deadlines —
heartbeat, upgrade, CONNECT — keep an exact timer per session, engine.py, for their sub-second
precision; the loop does what is checked, not what falls due.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.core.closecodes import CloseCode
from services.socket.delivery import LiveSession

log = logging.getLogger(__name__)


class SessionRegistry:
    def __init__(self, max_connections: int) -> None:
        self._max = max_connections
        self._sessions: dict[LiveSession, None] = {}  # in opening order
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    @property
    def full(self) -> bool:
        """At MAX_CONNECTIONS: a new session of any kind is refused."""
        return len(self._sessions) >= self._max

    def opened(self, session: LiveSession) -> None:
        self._sessions[session] = None
        self._empty.clear()

    def closed(self, session: LiveSession) -> None:
        self._sessions.pop(session, None)
        if not self._sessions:
            self._empty.set()

    def snapshot(self) -> list[LiveSession]:
        return list(self._sessions)

    def maintain(self, now: float) -> None:
        """One maintenance tick over every session."""
        for session in list(self._sessions):
            if not session.open:
                continue
            try:
                session.maintain(now)
            except Exception:  # one bad session must not stop the checks of the others
                log.exception("session maintenance failed")
                session.abort()

    def close_all(self, code: CloseCode, reason: str) -> None:
        for session in list(self._sessions):
            session.close(code, reason)

    async def drain(self, window_s: float, close_timeout_s: float) -> None:
        """Closes every session with 1012 (socket.io: a close packet), spread evenly over
        `window_s`; waits up to `close_timeout_s` for the goodbyes, then aborts what is left."""
        sessions = list(self._sessions)
        if sessions:
            step = window_s / len(sessions)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for index, session in enumerate(sessions):
                delay = start + index * step - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                session.close(CloseCode.RESTART, "server restarting")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), close_timeout_s)
        for session in list(self._sessions):
            with contextlib.suppress(Exception):
                session.abort()
            self.closed(session)
