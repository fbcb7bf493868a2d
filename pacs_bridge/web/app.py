"""The FastAPI application of the console and HTTP API (:func:`create_app`).

Routes: the pages (:mod:`pacs_bridge.web.pages`), the JSON API
(:mod:`pacs_bridge.web.api`), DICOMweb STOW-RS (:mod:`pacs_bridge.web.dicomweb`),
``/healthz`` (open, details for logged-in callers), ``/metrics`` and
``/openapi.json`` (both behind authentication). Every response carries
headers that keep the pages out of frames, caches and other origins; the
access log names method, path (never the query string), status and user.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from pacs_bridge.config import Settings
from pacs_bridge.health import Health
from pacs_bridge.store.db import Database
from pacs_bridge.web import api, dicomweb, pages
from pacs_bridge.web.auth import Authenticator, LoginThrottle, Principal, SessionSigner
from pacs_bridge.web.context import Console, LoginRequired, current_principal, require_reader
from pacs_bridge.web.healthz import health_check
from pacs_bridge.web.metrics import CONTENT_TYPE, ServiceMetrics

__all__ = ["create_app"]

LOGGER = logging.getLogger(__name__)

_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def create_app(
    settings: Settings,
    db: Database,
    health: Health,
    ingestor: Any,
    analyser_factory: Callable[[], Any | None],
    *,
    first_login_password: str | None = None,
    signer: SessionSigner | None = None,
    throttle: LoginThrottle | None = None,
) -> FastAPI:
    """The console app for one node; ``first_login_password`` is the one-time ``admin`` password, if any."""
    app = FastAPI(
        title="pacs-bridge",
        summary="AI fracture detection between a PACS and ONNX Runtime: console and HTTP API",
        version=_version(),
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    metrics = ServiceMetrics(db, health, lambda: console.model_identity())  # noqa: PLW0108 (console is bound below)
    console = Console(
        settings=settings,
        db=db,
        health=health,
        ingestor=ingestor,
        analyser_factory=analyser_factory,
        auth=Authenticator(settings.web, first_login_password=first_login_password),
        signer=signer or SessionSigner(settings.web.session_minutes),
        throttle=throttle or LoginThrottle(),
        metrics=metrics,
    )
    app.state.console = console
    if ingestor is not None:
        metrics.observe_ingest(ingestor)
    metrics.start()

    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(dicomweb.router)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).with_name("static"))), name="static")

    @app.get("/healthz", tags=["service"], summary="Is every part of this node working?")
    def healthz(request: Request) -> JSONResponse:
        """200 when healthy, 503 otherwise; the checks in detail for authenticated callers only."""
        ok, checks = health_check(console.settings, console.db, console.health, console.analyser_factory)
        body: dict[str, Any] = {"ok": ok}
        if current_principal(request) is not None:
            body["checks"] = checks
        else:
            body["checks"] = {name: {"ok": check["ok"]} for name, check in checks.items()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (text format 0.0.4)")
    def metrics_endpoint(_who: Annotated[Principal, Depends(require_reader)]) -> Response:
        """Counters of this process and gauges read from the database at scrape time."""
        return Response(console.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_who: Annotated[Principal, Depends(require_reader)]) -> JSONResponse:
        """The OpenAPI document of the HTTP API."""
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
        return JSONResponse(app.openapi_schema)

    @app.exception_handler(LoginRequired)
    async def _to_login(_request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={exc.next_path}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        wants_html = "text/html" in request.headers.get("accept", "") and not request.url.path.startswith(
            ("/api/", "/dicomweb/")
        )
        if wants_html and exc.status_code in (403, 404, 409, 413, 422, 503):
            return pages.templates.TemplateResponse(
                request,
                "error.html",
                {"status": exc.status_code, "message": exc.detail, "user": None, "csrf": "", "done": None},
                status_code=exc.status_code,
                headers=getattr(exc, "headers", None),
            )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems}, status_code=422)

    @app.middleware("http")
    async def _headers_and_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        if console.secure_cookies:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        principal: Principal | None = getattr(request.state, "principal", None)
        level = logging.INFO if request.method not in ("GET", "HEAD") else logging.DEBUG
        LOGGER.log(
            level,
            "web: %s %s %d %s %.0f ms",
            request.method,
            request.url.path,  # never the query string
            response.status_code,
            principal.name if principal else "-",
            (time.perf_counter() - started) * 1000,
        )
        return response

    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pacs-bridge")
    except Exception:
        return "0"
