// Drives real socket.io-client sockets for the pytest suite (tests/socketio/support.py).
//
// stdin: one JSON command per line; stdout: one JSON record per line.
//   {"cmd": "connect", "name", "url", "opts"}     -> {"ev": "connect" | "connect_error" | "disconnect" | "upgrade" | "event", "name", ...}
//   {"cmd": "emit", "name", "event", "args", "ref"} -> {"ev": "ack", "ref", "name", "err", "res"}
//   {"cmd": "close", "name"}                        -> {"ev": "closed", "name"}
//   {"cmd": "drop", "name"}    closes the Engine.IO connection as a network cut would: the
//                              client reconnects by itself (and recovers)
//   {"cmd": "offset", "name", "offset"} sets what socket.io-client sends back as its offset
//                              (its private `_lastOffset`), to test a forged one -> {"ev": "offset"}
//   {"cmd": "exit"}
// Every connect record carries `recovered`, the socket id, the Engine.IO transport and the pod
// (the `X-Pubsock-Pod` header of the transport's last HTTP response: a long poll, or the
// websocket handshake) so the tests can tell which pod serves which client.
import { createInterface } from "node:readline";
import { io, NodeWebSocket, NodeXHR } from "socket.io-client";

const sockets = new Map();

// socket.io-client's own Node transports, noting the pod header of each response they get.
class PodPolling extends NodeXHR {
  request(opts = {}) {
    const request = super.request(opts); // engine.io-client's Request: its XHR is sent already
    const xhr = request._xhr;
    const onLoad = () => {
      const pod = xhr.getResponseHeader("x-pubsock-pod");
      if (pod) this.pod = pod;
    };
    request.on("data", onLoad); // before the request drops its XHR
    request.on("success", onLoad);
    return request;
  }
}

class PodWebSocket extends NodeWebSocket {
  createSocket(uri, protocols, opts) {
    const ws = super.createSocket(uri, protocols, opts);
    ws.on("upgrade", (response) => {
      this.pod = response.headers["x-pubsock-pod"] ?? null;
    });
    return ws;
  }
}

const TRANSPORTS = { polling: PodPolling, websocket: PodWebSocket };

function podOf(manager) {
  return manager.engine?.transport?.pod ?? null;
}

function out(record) {
  process.stdout.write(JSON.stringify(record) + "\n");
}

function watchEngine(name, manager) {
  const engine = manager.engine;
  if (!engine || engine.__watched) return;
  engine.__watched = true;
  engine.on("upgrade", (transport) => {
    out({ ev: "upgrade", name, transport: transport.name, pod: transport.pod ?? null });
  });
}

function connect({ name, url, opts }) {
  // `transports` by name, as socket.io-client takes them, become the classes above.
  const names = opts.transports ?? ["polling", "websocket"];
  const transports = names.map((transport) => TRANSPORTS[transport]);
  const socket = io(url, { forceNew: true, ...opts, transports });
  const manager = socket.io;
  watchEngine(name, manager);
  const open = manager.open.bind(manager);
  manager.open = manager.connect = (fn) => {
    const result = open(fn);
    watchEngine(name, manager);
    return result;
  };
  socket.on("connect", () => {
    out({
      ev: "connect",
      name,
      id: socket.id,
      recovered: socket.recovered,
      transport: manager.engine.transport.name,
      pod: podOf(manager),
    });
  });
  socket.on("connect_error", (err) => {
    out({ ev: "connect_error", name, message: err.message, data: err.data ?? null });
  });
  socket.on("disconnect", (reason) => {
    out({ ev: "disconnect", name, reason });
  });
  socket.onAny((event, ...args) => {
    out({ ev: "event", name, event, args, pod: podOf(manager) });
  });
  sockets.set(name, socket);
}

function emit({ name, event, args, ref, timeoutMs }) {
  const socket = sockets.get(name);
  socket.timeout(timeoutMs ?? 10000).emit(event, ...(args ?? []), (err, res) => {
    out({ ev: "ack", name, ref, err: err ? String(err.message ?? err) : null, res: res ?? null });
  });
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (!line.trim()) return;
  const command = JSON.parse(line);
  try {
    switch (command.cmd) {
      case "connect":
        connect(command);
        break;
      case "emit":
        emit(command);
        break;
      case "close":
        sockets.get(command.name)?.disconnect();
        sockets.delete(command.name);
        out({ ev: "closed", name: command.name });
        break;
      case "drop":
        sockets.get(command.name).io.engine.close();
        break;
      case "offset":
        sockets.get(command.name)._lastOffset = command.offset;
        out({ ev: "offset", name: command.name });
        break;
      case "exit":
        for (const socket of sockets.values()) socket.disconnect();
        process.exit(0);
        break;
      default:
        out({ ev: "error", message: `unknown command ${command.cmd}` });
    }
  } catch (error) {
    out({ ev: "error", message: String(error?.stack ?? error) });
  }
});
// The parent's pipe closing (pytest ended or died) ends this process too.
lines.on("close", () => process.exit(0));
