"""What the search service gives browsers: the page, the API docs with assets served here (no CDN: the docs work
offline and load no third-party code), and the headers every answer carries.

Every answer says ``X-Content-Type-Options: nosniff`` (a browser takes a thumbnail or a video for what its
``Content-Type`` says, never for HTML it sniffed), ``X-Frame-Options: DENY`` (no other site frames the page to
trick clicks) and ``Referrer-Policy: no-referrer`` (a presigned media URL's host never learns the page's address).
HTML answers also carry a Content-Security-Policy that allows only their own inline script and style (by hash)
and this service's assets: a value an index holds, shown by the page, can never run as script.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DOCS_PATH = "/docs"
_DOCS_ASSETS = {  # served name -> (file of fastapi_offline's static folder, media type)
    "swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    "favicon.png": ("favicon.png", "image/png"),
}
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


class SecurityHeaders:
    """ASGI middleware: the headers of the module docstring on every HTTP answer that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _hashes(html: str, kind: str) -> str:
    """CSP sources for each inline `kind` element (script or style) of `html`: ``'sha256-...'``."""
    digests = [hashlib.sha256(body.encode("utf-8")).digest() for tag, body in _INLINE.findall(html) if tag == kind]
    return " ".join(f"'sha256-{base64.b64encode(d).decode('ascii')}'" for d in digests)


def page_csp(html: str) -> str:
    """The page's policy: its inline script and style, thumbnails and API calls here, videos here or where /media
    redirects (a presigned object store URL), nothing else; no framing, no <base>, forms submit here only."""
    return (
        f"default-src 'none'; script-src {_hashes(html, 'script')}; style-src {_hashes(html, 'style')}; "
        "img-src 'self'; media-src 'self' https: http:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


_ICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="6.5" cy="6.5" r="4.5" fill="none" '
    b'stroke="#1565c0" stroke-width="2"/><path d="M10 10l4.5 4.5" stroke="#1565c0" stroke-width="2"/></svg>'
)
"""The page's icon (a magnifier): without one, every page load asked for /favicon.ico and logged its 404."""


def add_page_route(app: FastAPI) -> None:
    """``/``: the search page, with its policy, and ``/favicon.svg``, its icon."""
    html = resources.files("index").joinpath("static").joinpath("index.html").read_text(encoding="utf-8")
    headers = {"Content-Security-Policy": page_csp(html)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    @app.get("/favicon.svg", include_in_schema=False)
    async def icon() -> Response:
        return Response(_ICON, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})


def add_docs_routes(app: FastAPI, *, title: str) -> None:
    """``/docs``: Swagger UI over ``/openapi.json``, its script, style and icon served from the installed
    ``fastapi-offline`` package. Create `app` with ``docs_url=None, redoc_url=None``."""
    static = resources.files("fastapi_offline").joinpath("static")
    assets = {name: (static.joinpath(file).read_bytes(), kind) for name, (file, kind) in _DOCS_ASSETS.items()}
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{title}: API",
        swagger_js_url=f"{DOCS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_PATH}/favicon.png",
        oauth2_redirect_url=None,
    )
    html = bytes(page.body).decode("utf-8")
    # Swagger UI sets style attributes and inline SVG, so styles stay open; scripts are its bundle and the one
    # inline call that starts it.
    csp = (
        f"default-src 'none'; script-src 'self' {_hashes(html, 'script')}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )

    @app.get(DOCS_PATH, response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    @app.get(DOCS_PATH + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404)
        body, kind = assets[name]
        return Response(body, media_type=kind, headers={"Cache-Control": "public, max-age=86400"})
