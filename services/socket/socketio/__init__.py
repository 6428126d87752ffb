"""socket.io v4 clients (Engine.IO protocol 4, Socket.IO protocol 5) on a socket pod's port.

See docs/socketio.md. `SocketIOServer` is mounted by the pod; the gateway routes the socket.io
path to it.
"""

from services.socket.socketio.server import SocketIOServer

__all__ = ["SocketIOServer"]
