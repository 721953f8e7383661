"""`/ui/`: the dashboard, static files shipped in the package (`app/static/ui`): plain ES modules, no
build step, no CDN. The page reads the API like any client (the key it is given stays in the tab's
sessionStorage); its Content-Security-Policy lets it reach nothing but this origin."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

ASSETS = Path(__file__).resolve().parents[2] / "static" / "ui"
PATH = "/ui"
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class Assets(StaticFiles):
    """The page's files, each answered with the policy and no sniffing."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"content-security-policy", POLICY.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                message["headers"] = headers
            await send(message)

        await super().__call__(scope, receive, with_headers)


assets = Assets(directory=ASSETS, html=True)


async def _to_slash(_: object) -> Response:
    return RedirectResponse(f"{PATH}/", status_code=308)


redirect = Route(PATH, _to_slash, methods=["GET", "HEAD"], include_in_schema=False)
