"""`python -m devtools.strictpubsub --upstream 127.0.0.1:8085 --port P --admin-port A --dir D`

Serves the strict stand-in (gRPC over TLS on P) and its metadata server and controls (HTTP on
A); writes the test CA to D/tls/ca.pem. Stops on SIGTERM or SIGINT, removing its taps.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc
import uvicorn

from devtools.strictpubsub.admin import create_admin_app
from devtools.strictpubsub.standin import StandIn
from devtools.strictpubsub.tls import make_tls


def _lifetime(text: str) -> tuple[float, float] | None:
    if text in ("", "0", "off"):
        return None
    low, _, high = text.partition(":")
    return float(low), float(high or low)


async def serve(args: argparse.Namespace) -> None:
    tls = make_tls(Path(args.dir) / "tls")
    standin = StandIn(args.upstream, _lifetime(args.stream_lifetime), args.seed)
    server = grpc.aio.server(
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )
    server.add_generic_rpc_handlers((standin.handler(),))
    credentials = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())])
    server.add_secure_port(f"127.0.0.1:{args.port}", credentials)
    await server.start()
    admin = uvicorn.Server(
        uvicorn.Config(
            create_admin_app(standin, args.project),
            host="127.0.0.1",
            port=args.admin_port,
            log_level="warning",
            lifespan="off",
        )
    )
    logging.getLogger("strictpubsub").info(
        "strict stand-in serving", extra={"port": args.port, "upstream": args.upstream}
    )
    try:
        await admin.serve()  # until SIGTERM or SIGINT
    finally:
        await standin.close()
        await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devtools.strictpubsub")
    parser.add_argument("--upstream", required=True, help="the emulator, host:port")
    parser.add_argument("--port", type=int, required=True, help="gRPC (TLS) port")
    parser.add_argument("--admin-port", type=int, required=True, help="metadata and controls")
    parser.add_argument("--dir", required=True, help="where the test CA and certificate go")
    parser.add_argument("--project", default="local-project")
    parser.add_argument(
        "--stream-lifetime",
        default="10:40",
        help="seconds MIN:MAX after which the server closes a stream (UNAVAILABLE); 0: never",
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s strictpubsub %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
