"""The review server: server-rendered pages (FastAPI + Jinja2, a few lines of JavaScript for zoom
and heatmap opacity), one database transaction per submission.

Rater pages live under ``/r/{token}`` (the secret invitation link; only the token's hash is
stored): session questions, then per case the own read (stage 1), the AI's prediction (stage 2)
and the explanations under neutral letters (stage 3), then the closing questions. A rater reaches
only their own assignments. Admin routes take ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import base64
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from pellucid.review.db import (
    Assignment,
    Case,
    Explanation,
    Rater,
    Rating,
    Read,
    Study,
    make_engine,
    migrate,
    now,
    sessions,
)
from pellucid.review.security import FailureLimiter, csrf_ok, csrf_token, hash_token, neutralised

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RATING_FIELDS = (("agreement", 0, 10), ("spatial", 1, 5), ("usefulness", 1, 5), ("trust", 1, 5))
START_FIELDS = (("years_experience", 0, 60), ("ai_familiarity", 1, 5), ("trust_start", 0, 10),
                ("willingness_start", 0, 10))
END_FIELDS = (("trust_end", 0, 10), ("willingness_end", 0, 10))
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class Invalid(Exception):
    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def _int(form: dict, key: str, lo: int, hi: int, label: str, errors: dict) -> int | None:
    raw = str(form.get(key, "")).strip()
    if raw == "":
        errors[key] = f"{label}: please answer"
        return None
    try:
        value = int(raw)
    except ValueError:
        errors[key] = f"{label}: {raw!r} is not a whole number"
        return None
    if not lo <= value <= hi:
        errors[key] = f"{label}: must be between {lo} and {hi}, got {value}"
        return None
    return value


def _yes_no(form: dict, key: str, label: str, errors: dict) -> bool | None:
    raw = str(form.get(key, "")).strip().lower()
    if raw not in ("yes", "no"):
        errors[key] = f"{label}: answer yes or no"
        return None
    return raw == "yes"


@dataclass
class RaterContext:
    rater: Rater
    study: Study
    csrf: str


def create_review_app(db: str, failures: FailureLimiter | None = None) -> FastAPI:
    """The review app on database ``db`` (a SQLite path or a SQLAlchemy/PostgreSQL URL); the
    schema is migrated to the latest revision at start. Every page carries the security headers
    (CSP without inline code, no framing, no referrer; token pages are not cached); an address
    with too many failed invitation or admin tokens (``failures``) is answered 429."""
    engine = make_engine(db)
    migrate(engine)
    make_session = sessions(engine)
    import jinja2

    # autoescape everything: select_autoescape() would skip the ".j2" templates
    loader = jinja2.FileSystemLoader(Path(__file__).parent / "templates")
    templates = Jinja2Templates(env=jinja2.Environment(loader=loader, autoescape=True))
    app = FastAPI(title="pellucid review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    limiter = failures or FailureLimiter()
    app.state.failures = limiter
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")

    def address(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        token_route = path.startswith(("/r/", "/admin/"))
        if token_route:
            wait = limiter.blocked(address(request))
            if wait:
                return JSONResponse({"error": "too many failed attempts from this address; try "
                                              "again later"}, status_code=429,
                                    headers={"Retry-After": str(int(wait))} | SECURITY_HEADERS)
        response = await call_next(request)
        if token_route and response.status_code == 403:
            limiter.failed(address(request))
        response.headers.update(SECURITY_HEADERS)
        if token_route:
            response.headers["Cache-Control"] = "no-store"
        return response

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def forbidden(request: Request, why: str) -> HTMLResponse:
        return page(request, "forbidden.html.j2", 403, why=why)

    def rater_of(s: Session, token: str) -> RaterContext | None:
        rater = s.scalar(select(Rater).where(Rater.token_hash == hash_token(token)))
        if rater is None:
            return None
        study = s.get(Study, rater.study_id)
        return RaterContext(rater, study, csrf_token(study.secret, rater.id))

    def verified(s: Session, request: Request, token: str,
                 form: dict[str, str]) -> RaterContext | Response:
        """The rater of a form submission, or the 403 page: unknown token, missing or foreign
        CSRF token."""
        ctx = rater_of(s, token)
        if ctx is None:
            return forbidden(request, "This invitation link is not valid.")
        if not csrf_ok(ctx.study.secret, ctx.rater.id, form.get("csrf")):
            return forbidden(request, "The form could not be verified (missing or wrong CSRF "
                                      "token). Reload the page and try again.")
        return ctx

    async def form_of(request: Request) -> dict[str, str]:
        return {k: str(v) for k, v in (await request.form(max_files=0, max_fields=200)).items()}

    def assignments(s: Session, rater: Rater) -> list[Assignment]:
        return list(s.scalars(select(Assignment).where(Assignment.rater_id == rater.id)
                              .order_by(Assignment.position)))

    def next_url(s: Session, token: str, ctx: RaterContext) -> str:
        if ctx.rater.started_at is None:
            return f"/r/{token}"
        for a in assignments(s, ctx.rater):
            read = s.scalar(select(Read).where(Read.assignment_id == a.id))
            if read is None or read.stage < 4:
                return f"/r/{token}/case/{a.position}"
        return f"/r/{token}/end"

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> HTMLResponse:
        return page(request, "home.html.j2")

    @app.get("/r/{token}", response_class=HTMLResponse)
    def landing(request: Request, token: str) -> Response:
        with make_session() as s:
            ctx = rater_of(s, token)
            if ctx is None:
                return forbidden(request, "This invitation link is not valid.")
            if ctx.rater.started_at is not None:
                return RedirectResponse(next_url(s, token, ctx), status_code=303)
            return page(request, "start.html.j2", ctx=ctx, token=token, values={}, errors={},
                        cases=len(assignments(s, ctx.rater)))

    @app.post("/r/{token}/start", response_class=HTMLResponse)
    async def start(request: Request, token: str) -> Response:
        form = await form_of(request)
        return await run_in_threadpool(start_sync, request, token, form)

    def start_sync(request: Request, token: str, form: dict[str, str]) -> Response:
        with make_session() as s, s.begin():
            ctx = verified(s, request, token, form)
            if isinstance(ctx, Response):
                return ctx
            errors: dict[str, str] = {}
            role = form.get("role", "").strip()
            if not role or len(role) > 100:
                errors["role"] = "Role: please answer (at most 100 characters)"
            values = {key: _int(form, key, lo, hi, key.replace("_", " ").capitalize(), errors)
                      for key, lo, hi in START_FIELDS}
            if ctx.rater.started_at is not None:  # answered once: a replay of the same answers is
                recorded = {key: getattr(ctx.rater, key) for key, _, _ in START_FIELDS}  # no change
                if not errors and role == ctx.rater.role and values == recorded:
                    return RedirectResponse(f"/r/{token}", status_code=303)
                return page(request, "start.html.j2", 409, ctx=ctx, token=token, values=form,
                            errors={"role": "These answers are already recorded and cannot be "
                                            "changed."}, cases=len(assignments(s, ctx.rater)))
            if errors:
                return page(request, "start.html.j2", 422, ctx=ctx, token=token, values=form,
                            errors=errors, cases=len(assignments(s, ctx.rater)))
            ctx.rater.role = role
            for key, value in values.items():
                setattr(ctx.rater, key, value)
            ctx.rater.started_at = ctx.rater.started_at or now()
        return RedirectResponse(f"/r/{token}", status_code=303)

    def load_case(s: Session, ctx: RaterContext, position: int):
        a = s.scalar(select(Assignment).where(Assignment.rater_id == ctx.rater.id,
                                              Assignment.position == position))
        if a is None:
            return None, None, None
        read = s.scalar(select(Read).where(Read.assignment_id == a.id))
        return a, s.get(Case, a.case_id), read

    def case_page(request: Request, s: Session, token: str, ctx: RaterContext, a: Assignment,
                  case: Case, read: Read, status: int = 200, errors: dict | None = None,
                  values: dict | None = None) -> HTMLResponse:
        stage = min(read.stage, 3)
        shown = []
        if stage == 3 and not a.control:
            by_id = {e.id: e for e in s.scalars(select(Explanation).where(Explanation.case_id == case.id))}
            previous = {r.explanation_id: r for r in s.scalars(
                select(Rating).where(Rating.assignment_id == a.id))}
            for letter, eid in zip(LETTERS, a.order, strict=False):
                r = previous.get(eid)
                shown.append({"letter": letter, "overlay": _data_uri(by_id[eid].overlay_png),
                              "previous": {f: getattr(r, f) for f, _, _ in RATING_FIELDS} if r else {}})
        total = len(assignments(s, ctx.rater))
        return page(request, "case.html.j2", status, ctx=ctx, token=token, a=a, case=case, read=read,
                    stage=stage, total=total, image=_data_uri(case.image_png), explanations=shown,
                    rating_fields=RATING_FIELDS, errors=errors or {}, values=values or {},
                    finding=ctx.study.finding)

    @app.get("/r/{token}/case/{position}", response_class=HTMLResponse)
    def show_case(request: Request, token: str, position: int) -> Response:
        with make_session() as s, s.begin():
            ctx = rater_of(s, token)
            if ctx is None:
                return forbidden(request, "This invitation link is not valid.")
            if ctx.rater.started_at is None:
                return RedirectResponse(f"/r/{token}", status_code=303)
            a, case, read = load_case(s, ctx, position)
            if a is None:
                return page(request, "forbidden.html.j2", 404, why="No such case in your study.")
            if read is None:  # the clock starts when the case is first shown
                read = Read(assignment_id=a.id, stage=1, opened_at=now(), updated_at=now())
                s.add(read)
                s.flush()
            return case_page(request, s, token, ctx, a, case, read)

    @app.post("/r/{token}/case/{position}/{stage}", response_class=HTMLResponse)
    async def submit(request: Request, token: str, position: int, stage: int) -> Response:
        form = await form_of(request)
        return await run_in_threadpool(submit_sync, request, token, position, stage, form)

    def submit_sync(request: Request, token: str, position: int, stage: int,
                    form: dict[str, str]) -> Response:
        with make_session() as s, s.begin():
            ctx = verified(s, request, token, form)
            if isinstance(ctx, Response):
                return ctx
            a, case, read = load_case(s, ctx, position)
            if a is None or read is None or stage not in (1, 2, 3):
                return page(request, "forbidden.html.j2", 404, why="No such case in your study.")
            if stage > read.stage:
                return RedirectResponse(f"/r/{token}/case/{position}", status_code=303)
            errors: dict[str, str] = {}
            finding = _yes_no(form, "finding", f"{ctx.study.finding} present", errors)
            confidence = _int(form, "confidence", 1, 5, "Confidence", errors)
            if stage < read.stage and stage < 3:  # a repeated own/AI-stage read: same answer or refused
                if (finding, confidence) == (getattr(read, f"finding{stage}"),
                                             getattr(read, f"confidence{stage}")):
                    return RedirectResponse(f"/r/{token}/case/{position}", status_code=303)
                errors["finding"] = ("This answer is already recorded and cannot be changed after "
                                     "the next stage was shown.")
                return case_page(request, s, token, ctx, a, case, read, 409, errors, form)
            ratings: dict[int, dict[str, int | None]] = {}
            if stage == 3:
                comment = form.get("comment", "")
                if len(comment) > 2000:
                    errors["comment"] = "Comment: at most 2000 characters"
                would_check = None
                if not a.control:
                    would_check = _yes_no(form, "would_check", "Would you check the explanation",
                                          errors)
                    for letter, eid in zip(LETTERS, a.order, strict=False):
                        ratings[eid] = {f: _int(form, f"{f}_{letter}", lo, hi,
                                                f"{letter}: {f}", errors)
                                        for f, lo, hi in RATING_FIELDS}
            if errors:
                return case_page(request, s, token, ctx, a, case, read, 422, errors, form)
            setattr(read, f"finding{stage}", finding)
            setattr(read, f"confidence{stage}", confidence)
            if stage == 3:
                read.comment = form.get("comment", "").strip() or None
                read.would_check = would_check
                if read.seconds is None:
                    read.seconds = (now() - _aware(read.opened_at)).total_seconds()
                existing = {r.explanation_id: r for r in s.scalars(
                    select(Rating).where(Rating.assignment_id == a.id))}
                for letter, eid in zip(LETTERS, a.order if not a.control else [], strict=False):
                    row = existing.get(eid) or Rating(assignment_id=a.id, explanation_id=eid,
                                                      letter=letter)
                    for f, value in ratings[eid].items():
                        setattr(row, f, value)
                    row.updated_at = now()
                    s.add(row)
            read.stage = max(read.stage, stage + 1)
            read.updated_at = now()
            s.flush()
            target = f"/r/{token}/case/{position}" if stage < 3 else next_url(s, token, ctx)
        return RedirectResponse(target, status_code=303)

    @app.get("/r/{token}/end", response_class=HTMLResponse)
    def end_page(request: Request, token: str) -> Response:
        with make_session() as s:
            ctx = rater_of(s, token)
            if ctx is None:
                return forbidden(request, "This invitation link is not valid.")
            if next_url(s, token, ctx) != f"/r/{token}/end":
                return RedirectResponse(next_url(s, token, ctx), status_code=303)
            if ctx.rater.finished_at is not None:
                return page(request, "done.html.j2", ctx=ctx, token=token)
            return page(request, "end.html.j2", ctx=ctx, token=token, values={}, errors={})

    @app.post("/r/{token}/end", response_class=HTMLResponse)
    async def end_submit(request: Request, token: str) -> Response:
        form = await form_of(request)
        return await run_in_threadpool(end_sync, request, token, form)

    def end_sync(request: Request, token: str, form: dict[str, str]) -> Response:
        with make_session() as s, s.begin():
            ctx = verified(s, request, token, form)
            if isinstance(ctx, Response):
                return ctx
            errors: dict[str, str] = {}
            values = {key: _int(form, key, lo, hi, key.replace("_", " ").capitalize(), errors)
                      for key, lo, hi in END_FIELDS}
            if ctx.rater.finished_at is not None:  # the study is finished for this rater
                recorded = {key: getattr(ctx.rater, key) for key, _, _ in END_FIELDS}
                if not errors and values == recorded:
                    return RedirectResponse(f"/r/{token}/end", status_code=303)
                return page(request, "end.html.j2", 409, ctx=ctx, token=token, values=form,
                            errors={"trust_end": "These answers are already recorded and cannot "
                                                 "be changed."})
            if next_url(s, token, ctx) != f"/r/{token}/end":  # not every case is read yet
                return RedirectResponse(next_url(s, token, ctx), status_code=303)
            if errors:
                return page(request, "end.html.j2", 422, ctx=ctx, token=token, values=form,
                            errors=errors)
            for key, value in values.items():
                setattr(ctx.rater, key, value)
            ctx.rater.finished_at = now()
        return RedirectResponse(f"/r/{token}/end", status_code=303)

    # ---- admin ----
    def admin_study(s: Session, request: Request) -> Study | None:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        return s.scalar(select(Study).where(Study.admin_token_hash == hash_token(auth[7:].strip())))

    @app.get("/admin/progress")
    def progress(request: Request) -> Response:
        with make_session() as s:
            study = admin_study(s, request)
            if study is None:
                return JSONResponse({"error": "invalid admin token"}, status_code=403)
            raters = list(s.scalars(select(Rater).where(Rater.study_id == study.id)))
            out = []
            for r in raters:
                n_done = s.scalar(select(func.count(Read.id)).join(
                    Assignment, Read.assignment_id == Assignment.id).where(
                    Assignment.rater_id == r.id, Read.stage == 4))
                out.append({"rater": r.label, "cases_done": n_done,
                            "finished": r.finished_at is not None})
            return JSONResponse({"study": study.name, "raters": out})

    @app.post("/admin/raters")
    async def invite(request: Request) -> Response:
        with make_session() as s:  # authentication first, then the body
            study = admin_study(s, request)
            if study is None:
                return JSONResponse({"error": "invalid admin token"}, status_code=403)
            study_id = study.id
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "send a JSON object {\"label\": ...}"}, status_code=422)
        if not isinstance(body, dict):
            return JSONResponse({"error": "send a JSON object {\"label\": ...}"}, status_code=422)
        label = str(body.get("label", "")).strip()
        if len(label) > 100 or not label.isprintable():
            return JSONResponse({"error": "label: at most 100 printable characters"}, status_code=422)
        if not label:
            return JSONResponse({"error": "label: give the rater's label"}, status_code=422)
        from pellucid.errors import ConfigError
        from pellucid.review.create import add_rater

        try:
            token = add_rater(db, study_id, label)
        except ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"label": label, "link": f"/r/{token}"})

    @app.get("/admin/export/{table}.csv")
    def export(request: Request, table: str) -> Response:
        from pellucid.review.analysis import load_tables

        with make_session() as s:
            study = admin_study(s, request)
            if study is None:
                return JSONResponse({"error": "invalid admin token"}, status_code=403)
            study_id = study.id
        tables = load_tables(engine, study_id)
        if table not in tables:
            return JSONResponse({"error": f"unknown table; available: {', '.join(tables)}"},
                                status_code=404)
        buf = io.StringIO()
        neutralised(tables[table]).to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
        return Response(buf.getvalue(), media_type="text/csv")

    return app


def _aware(t):
    from datetime import UTC

    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()

