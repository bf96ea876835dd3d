"""An API explorer that works offline: Swagger UI from this machine instead of a CDN.

FastAPI's own ``/docs`` page loads Swagger UI from cdn.jsdelivr.net, so it is blank without
internet. `install_docs` replaces it (and ReDoc's page, which needs a CDN too) with the same
page whose script, stylesheet and icon come from the ``swagger-ui-py`` package's copy of
swagger-ui-dist, served by the app itself under `ASSETS_PATH`.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request

__all__ = ["ASSETS", "ASSETS_PATH", "install_docs"]

#: where the Swagger UI files are served
ASSETS_PATH = "/_flash/swagger-ui"

#: the files the page needs, and their content types
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}


def _asset(name: str) -> bytes:
    return (resources.files("swagger_ui") / "static" / name).read_bytes()


def install_docs(app: FastAPI) -> None:
    """Serve the explorer at ``app.docs_url`` (``/docs`` unless the app chose another).

    Does nothing when the app has no OpenAPI schema (``openapi_url=None``).
    """
    if app.openapi_url is None:
        return
    docs_url = app.docs_url or "/docs"
    dropped = {docs_url, app.redoc_url}
    app.router.routes[:] = [
        route
        for route in app.router.routes
        if not (isinstance(route, Route) and route.path in dropped)
    ]
    app.docs_url = docs_url
    app.redoc_url = None
    openapi_url = app.openapi_url
    cache: dict[str, bytes] = {}

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        kind = ASSETS.get(name)
        if kind is None:
            return Response(status_code=404)
        if name not in cache:
            cache[name] = _asset(name)
        return Response(
            cache[name], media_type=kind, headers={"Cache-Control": "max-age=3600"}
        )

    async def docs(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        oauth2 = app.swagger_ui_oauth2_redirect_url
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - API explorer",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            oauth2_redirect_url=root + oauth2 if oauth2 else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    app.add_route(f"{ASSETS_PATH}/{{name}}", asset, include_in_schema=False)
    app.add_route(docs_url, docs, include_in_schema=False)
