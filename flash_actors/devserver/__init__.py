"""``flash run``'s dev server: the project's FastAPI app plus Flash's dev routes, served by uvicorn.

`build_app` makes the app of a project folder: the FastAPI ``app`` of its ``main.py`` when it
has one (else an empty one), plus one route per ``@remote`` function found by
`flash_actors.build.scanner` (see `dev_routes` for the shapes, as runpod-flash's ``flash run``
has them), plus an API explorer at ``/docs`` whose Swagger UI assets are served from this
machine (no CDN). The flash-actors runtime runs in the app's lifespan, so stopping the server
stops every worker it started. Needs the ``dev`` extra: ``pip install 'flash-actors[dev]'``.
"""

from __future__ import annotations

from flash_actors.devserver.app import (
    AUTO_PROVISION_ENV,
    PROJECT_ENV,
    DevRoute,
    build_app,
    create_app,
    dev_routes,
)

__all__ = [
    "AUTO_PROVISION_ENV",
    "PROJECT_ENV",
    "DevRoute",
    "build_app",
    "create_app",
    "dev_routes",
]
