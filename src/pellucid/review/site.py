"""What every review page shares: the database sessions, the templates, and the look-ups of a
rater (by invitation token, with the CSRF check of a form), their assignments and the next page.
One :class:`Site` per app, reached from a handler by :func:`site_of`."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session

from pellucid.review.db import Assignment, Case, Explanation, Rater, Rating, Read, Study
from pellucid.review.forms import RATING_FIELDS
from pellucid.review.security import csrf_ok, csrf_token, hash_token

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class RaterContext:
    rater: Rater
    study: Study
    csrf: str


@dataclass
class Site:
    db: str  # the database as given (SQLite path or URL)
    engine: Any
    make_session: Any
    templates: Jinja2Templates

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def forbidden(self, request: Request, why: str) -> HTMLResponse:
        return self.page(request, "forbidden.html.j2", 403, why=why)

    def rater_of(self, s: Session, token: str) -> RaterContext | None:
        rater = s.scalar(select(Rater).where(Rater.token_hash == hash_token(token)))
        if rater is None:
            return None
        study = s.get(Study, rater.study_id)
        return RaterContext(rater, study, csrf_token(study.secret, rater.id))

    def verified(self, s: Session, request: Request, token: str,
                 form: dict[str, str]) -> RaterContext | Response:
        """The rater of a form submission, or the 403 page: unknown token, missing or foreign
        CSRF token."""
        ctx = self.rater_of(s, token)
        if ctx is None:
            return self.forbidden(request, "This invitation link is not valid.")
        if not csrf_ok(ctx.study.secret, ctx.rater.id, form.get("csrf")):
            return self.forbidden(request, "The form could not be verified (missing or wrong CSRF "
                                           "token). Reload the page and try again.")
        return ctx

    @staticmethod
    async def form_of(request: Request) -> dict[str, str]:
        return {k: str(v) for k, v in (await request.form(max_files=0, max_fields=200)).items()}

    @staticmethod
    def assignments(s: Session, rater: Rater) -> list[Assignment]:
        return list(s.scalars(select(Assignment).where(Assignment.rater_id == rater.id)
                              .order_by(Assignment.position)))

    def next_url(self, s: Session, token: str, ctx: RaterContext) -> str:
        if ctx.rater.started_at is None:
            return f"/r/{token}"
        for a in self.assignments(s, ctx.rater):
            read = s.scalar(select(Read).where(Read.assignment_id == a.id))
            if read is None or read.stage < 4:
                return f"/r/{token}/case/{a.position}"
        return f"/r/{token}/end"

    @staticmethod
    def admin_study(s: Session, request: Request) -> Study | None:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        return s.scalar(select(Study).where(Study.admin_token_hash == hash_token(auth[7:].strip())))

    def token_of(self, request: Request) -> str | None:
        """The request's invitation or admin token, as a key for the limiter ('' if none), when
        it is valid; None when the request carries an invalid one or none."""
        path = request.url.path
        with self.make_session() as s:
            if path.startswith("/r/"):
                token = path.split("/")[2] if len(path.split("/")) > 2 else ""
                return f"rater:{hash_token(token)}" if token and self.rater_of(s, token) else None
            if path.startswith("/admin/"):
                study = self.admin_study(s, request)
                return f"admin:{study.id}" if study is not None else None
        return None

    def load_case(self, s: Session, ctx: RaterContext, position: int):
        a = s.scalar(select(Assignment).where(Assignment.rater_id == ctx.rater.id,
                                              Assignment.position == position))
        if a is None:
            return None, None, None
        read = s.scalar(select(Read).where(Read.assignment_id == a.id))
        return a, s.get(Case, a.case_id), read

    def case_page(self, request: Request, s: Session, token: str, ctx: RaterContext, a: Assignment,
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
                shown.append({"letter": letter, "overlay": data_uri(by_id[eid].overlay_png),
                              "previous": {f: getattr(r, f) for f, _, _ in RATING_FIELDS} if r else {}})
        total = len(self.assignments(s, ctx.rater))
        return self.page(request, "case.html.j2", status, ctx=ctx, token=token, a=a, case=case, read=read,
                         stage=stage, total=total, image=data_uri(case.image_png), explanations=shown,
                         rating_fields=RATING_FIELDS, errors=errors or {}, values=values or {},
                         finding=ctx.study.finding)


def site_of(request: Request) -> Site:
    return request.app.state.site


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
