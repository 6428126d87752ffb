"""The stand-in's HTTP side: a fake GCE metadata server (so google-auth's Application Default
Credentials find a token, as on GKE with Workload Identity) and the controls tests call.

Metadata: `GCE_METADATA_HOST=127.0.0.1:<port>` (and `GCE_METADATA_IP`) gives the `default`
account's token; `127.0.0.1:<port>/as/<account>` another account's (`denied`,
`publisher-only`, or any unknown name: a token the stand-in refuses).
Controls (POST): /control/close-streams, /control/unavailable?seconds=N,
/control/stall?subscription=TEXT, /control/unstall, /control/seek-fails?on=1|0; GET /control/state.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from devtools.strictpubsub.standin import StandIn

FLAVOR = {"Metadata-Flavor": "Google"}
SCOPES = [
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/pubsub",
]


def create_admin_app(standin: StandIn, project: str) -> Starlette:
    def account_of(request: Request) -> str:
        return str(request.path_params.get("account", "default"))

    def flavored(request: Request) -> Response | None:
        if request.headers.get("metadata-flavor") != "Google":
            return PlainTextResponse("Missing Metadata-Flavor header", 403)
        return None

    async def root(request: Request) -> Response:
        return PlainTextResponse("computeMetadata/\n", headers=FLAVOR)

    async def metadata(request: Request) -> Response:
        refused = flavored(request)
        if refused is not None:
            return refused
        path = str(request.path_params["path"]).rstrip("/")
        account = account_of(request)
        email = f"{account}@{project}.iam.gserviceaccount.com"
        body: Any
        if path == "instance/service-accounts/default/token":
            body = {
                "access_token": standin.issue_token(account),
                "expires_in": 3599,
                "token_type": "Bearer",
            }
        elif path == "instance/service-accounts/default":
            body = {"email": email, "scopes": SCOPES, "aliases": ["default"]}
        elif path == "instance/service-accounts/default/email":
            return PlainTextResponse(email, headers=FLAVOR)
        elif path == "instance/service-accounts/default/scopes":
            return PlainTextResponse("\n".join(SCOPES), headers=FLAVOR)
        elif path == "project/project-id":
            return PlainTextResponse(project, headers=FLAVOR)
        else:  # universe/universe-domain among them: google-auth then uses googleapis.com
            return PlainTextResponse("not found", 404, headers=FLAVOR)
        return JSONResponse(body, headers=FLAVOR)

    async def close_streams(request: Request) -> Response:
        return JSONResponse({"closed": standin.close_streams()})

    async def unavailable(request: Request) -> Response:
        seconds = float(request.query_params.get("seconds", "5"))
        standin.unavailable_for(seconds)
        return JSONResponse({"unavailable_s": seconds})

    async def stall(request: Request) -> Response:
        part = request.query_params.get("subscription", "")
        if not part:
            return JSONResponse({"detail": "subscription=TEXT is required"}, 422)
        return JSONResponse({"stalled": standin.stall(part)})

    async def unstall(request: Request) -> Response:
        standin.unstall()
        return JSONResponse({"stalled": 0})

    async def seek_fails(request: Request) -> Response:
        standin.seek_fails = request.query_params.get("on", "1") not in ("0", "false")
        return JSONResponse({"seek_fails": standin.seek_fails})

    async def state(request: Request) -> Response:
        return JSONResponse(standin.state())

    return Starlette(
        routes=[
            Route("/", root),
            Route("/as/{account}", root),
            Route("/computeMetadata/v1/{path:path}", metadata),
            Route("/as/{account}/computeMetadata/v1/{path:path}", metadata),
            Route("/control/close-streams", close_streams, methods=["POST"]),
            Route("/control/unavailable", unavailable, methods=["POST"]),
            Route("/control/stall", stall, methods=["POST"]),
            Route("/control/unstall", unstall, methods=["POST"]),
            Route("/control/seek-fails", seek_fails, methods=["POST"]),
            Route("/control/state", state),
        ]
    )
