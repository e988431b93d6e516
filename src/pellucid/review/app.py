"""The clinician review study as a web app (FastAPI + Jinja templates + SQLAlchemy): blinded
explanations under neutral letters, Likert ratings, 2-stage reads (own read, then AI prediction
and heatmap opacity), one database transaction per submission. The rater pages are in
:mod:`pellucid.review.rater_pages`, the admin API in :mod:`pellucid.review.admin_api`; what they
share is :class:`pellucid.review.site.Site`."""

from __future__ import annotations

from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from pellucid.review import admin_api, rater_pages
from pellucid.review.db import make_engine, migrate, sessions
from pellucid.review.security import FailureLimiter
from pellucid.review.site import Site

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


TOKEN_FAILURE_FACTOR = 5  # a valid token may fail its CSRF check 5x the address limit


def _too_many(wait: float) -> JSONResponse:
    return JSONResponse({"error": "too many failed attempts; try again later"}, status_code=429,
                        headers={"Retry-After": str(int(wait))} | SECURITY_HEADERS)


def create_review_app(db: str, failures: FailureLimiter | None = None) -> FastAPI:
    """The review app on database ``db`` (a SQLite path or a SQLAlchemy/PostgreSQL URL); the
    schema is migrated to the latest revision at start. Every page carries the security headers
    (CSP without inline code, no framing, no referrer; token pages are not cached); an address
    with too many failed invitation or admin tokens (``failures``) is answered 429."""
    import jinja2

    engine = make_engine(db)
    migrate(engine)
    # autoescape everything: select_autoescape() would skip the ".j2" templates
    loader = jinja2.FileSystemLoader(Path(__file__).parent / "templates")
    templates = Jinja2Templates(env=jinja2.Environment(loader=loader, autoescape=True))
    app = FastAPI(title="pellucid review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.site = Site(db, engine, sessions(engine), templates)
    limiter = failures or FailureLimiter()
    app.state.failures = limiter
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    app.include_router(rater_pages.router)
    app.include_router(admin_api.router)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        token_route = path.startswith(("/r/", "/admin/"))
        address = request.client.host if request.client else "unknown"
        site = app.state.site
        valid: str | None = None  # the limiter's key of a valid token; None: invalid or none
        if token_route:
            valid = await anyio.to_thread.run_sync(site.token_of, request)
            # invalid tokens are limited per address; a valid one only by its own limit (its
            # stale forms), so a rater behind a shared address (a hospital's NAT) is never
            # locked out by others' failures
            wait = limiter.blocked(address if valid is None else valid)
            if wait:
                return _too_many(wait)
        response = await call_next(request)
        if token_route and response.status_code == 403:
            # a valid token's 403 is a stale or missing CSRF token: counted against that token
            # (with a higher limit), never against the address others share
            limiter.failed(address if valid is None else valid,
                           weight=1.0 if valid is None else 1.0 / TOKEN_FAILURE_FACTOR)
        response.headers.update(SECURITY_HEADERS)
        if token_route:
            response.headers["Cache-Control"] = "no-store"
        return response

    return app



