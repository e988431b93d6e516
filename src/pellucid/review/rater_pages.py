"""The rater's pages under ``/r/{token}`` (the secret invitation link; only the token's hash is
stored): session questions, then per case the own read (stage 1), the AI's prediction (stage 2)
and the explanations under neutral letters (stage 3), then the closing questions. A rater reaches
only their own assignments; each submission is one transaction, a repeated one changes nothing and
a changed answer after the next stage was shown is refused."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from pellucid.review.db import Rating, Read, now
from pellucid.review.forms import END_FIELDS, RATING_FIELDS, START_FIELDS, whole_number, yes_no
from pellucid.review.site import LETTERS, site_of

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> HTMLResponse:
    site = site_of(request)
    return site.page(request, "home.html.j2")


@router.get("/r/{token}", response_class=HTMLResponse)
def landing(request: Request, token: str) -> Response:
    site = site_of(request)
    with site.make_session() as s:
        ctx = site.rater_of(s, token)
        if ctx is None:
            return site.forbidden(request, "This invitation link is not valid.")
        if ctx.rater.started_at is not None:
            return RedirectResponse(site.next_url(s, token, ctx), status_code=303)
        return site.page(request, "start.html.j2", ctx=ctx, token=token, values={}, errors={},
                         cases=len(site.assignments(s, ctx.rater)))


@router.post("/r/{token}/start", response_class=HTMLResponse)
async def start(request: Request, token: str) -> Response:
    site = site_of(request)
    form = await site.form_of(request)
    return await run_in_threadpool(start_sync, request, token, form)


def start_sync(request: Request, token: str, form: dict[str, str]) -> Response:
    site = site_of(request)
    with site.make_session() as s, s.begin():
        ctx = site.verified(s, request, token, form)
        if isinstance(ctx, Response):
            return ctx
        errors: dict[str, str] = {}
        role = form.get("role", "").strip()
        if not role or len(role) > 100:
            errors["role"] = "Role: please answer (at most 100 characters)"
        values = {key: whole_number(form, key, lo, hi, key.replace("_", " ").capitalize(), errors)
                  for key, lo, hi in START_FIELDS}
        if ctx.rater.started_at is not None:  # answered once: a replay of the same answers is
            recorded = {key: getattr(ctx.rater, key) for key, _, _ in START_FIELDS}  # no change
            if not errors and role == ctx.rater.role and values == recorded:
                return RedirectResponse(f"/r/{token}", status_code=303)
            return site.page(request, "start.html.j2", 409, ctx=ctx, token=token, values=form,
                             errors={"role": "These answers are already recorded and cannot be "
                                        "changed."}, cases=len(site.assignments(s, ctx.rater)))
        if errors:
            return site.page(request, "start.html.j2", 422, ctx=ctx, token=token, values=form,
                             errors=errors, cases=len(site.assignments(s, ctx.rater)))
        ctx.rater.role = role
        for key, value in values.items():
            setattr(ctx.rater, key, value)
        ctx.rater.started_at = ctx.rater.started_at or now()
    return RedirectResponse(f"/r/{token}", status_code=303)


@router.get("/r/{token}/case/{position}", response_class=HTMLResponse)
def show_case(request: Request, token: str, position: int) -> Response:
    site = site_of(request)
    with site.make_session() as s, s.begin():
        ctx = site.rater_of(s, token)
        if ctx is None:
            return site.forbidden(request, "This invitation link is not valid.")
        if ctx.rater.started_at is None:
            return RedirectResponse(f"/r/{token}", status_code=303)
        a, case, read = site.load_case(s, ctx, position)
        if a is None:
            return site.page(request, "forbidden.html.j2", 404, why="No such case in your study.")
        if read is None:  # the clock starts when the case is first shown
            read = Read(assignment_id=a.id, stage=1, opened_at=now(), updated_at=now())
            s.add(read)
            s.flush()
        return site.case_page(request, s, token, ctx, a, case, read)


@router.post("/r/{token}/case/{position}/{stage}", response_class=HTMLResponse)
async def submit(request: Request, token: str, position: int, stage: int) -> Response:
    site = site_of(request)
    form = await site.form_of(request)
    return await run_in_threadpool(submit_sync, request, token, position, stage, form)


def submit_sync(request: Request, token: str, position: int, stage: int,
                form: dict[str, str]) -> Response:
    site = site_of(request)
    with site.make_session() as s, s.begin():
        ctx = site.verified(s, request, token, form)
        if isinstance(ctx, Response):
            return ctx
        a, case, read = site.load_case(s, ctx, position)
        if a is None or read is None or stage not in (1, 2, 3):
            return site.page(request, "forbidden.html.j2", 404, why="No such case in your study.")
        if stage > read.stage:
            return RedirectResponse(f"/r/{token}/case/{position}", status_code=303)
        errors: dict[str, str] = {}
        finding = yes_no(form, "finding", f"{ctx.study.finding} present", errors)
        confidence = whole_number(form, "confidence", 1, 5, "Confidence", errors)
        if stage < read.stage and stage < 3:  # a repeated own/AI-stage read: same answer or refused
            if (finding, confidence) == (getattr(read, f"finding{stage}"),
                                         getattr(read, f"confidence{stage}")):
                return RedirectResponse(f"/r/{token}/case/{position}", status_code=303)
            errors["finding"] = ("This answer is already recorded and cannot be changed after "
                                 "the next stage was shown.")
            return site.case_page(request, s, token, ctx, a, case, read, 409, errors, form)
        ratings: dict[int, dict[str, int | None]] = {}
        if stage == 3:
            comment = form.get("comment", "")
            if len(comment) > 2000:
                errors["comment"] = "Comment: at most 2000 characters"
            would_check = None
            if not a.control:
                would_check = yes_no(form, "would_check", "Would you check the explanation",
                                      errors)
                for letter, eid in zip(LETTERS, a.order, strict=False):
                    ratings[eid] = {f: whole_number(form, f"{f}_{letter}", lo, hi,
                                            f"{letter}: {f}", errors)
                                    for f, lo, hi in RATING_FIELDS}
        if errors:
            return site.case_page(request, s, token, ctx, a, case, read, 422, errors, form)
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
        target = f"/r/{token}/case/{position}" if stage < 3 else site.next_url(s, token, ctx)
    return RedirectResponse(target, status_code=303)


@router.get("/r/{token}/end", response_class=HTMLResponse)
def end_page(request: Request, token: str) -> Response:
    site = site_of(request)
    with site.make_session() as s:
        ctx = site.rater_of(s, token)
        if ctx is None:
            return site.forbidden(request, "This invitation link is not valid.")
        if site.next_url(s, token, ctx) != f"/r/{token}/end":
            return RedirectResponse(site.next_url(s, token, ctx), status_code=303)
        if ctx.rater.finished_at is not None:
            return site.page(request, "done.html.j2", ctx=ctx, token=token)
        return site.page(request, "end.html.j2", ctx=ctx, token=token, values={}, errors={})


@router.post("/r/{token}/end", response_class=HTMLResponse)
async def end_submit(request: Request, token: str) -> Response:
    site = site_of(request)
    form = await site.form_of(request)
    return await run_in_threadpool(end_sync, request, token, form)


def end_sync(request: Request, token: str, form: dict[str, str]) -> Response:
    site = site_of(request)
    with site.make_session() as s, s.begin():
        ctx = site.verified(s, request, token, form)
        if isinstance(ctx, Response):
            return ctx
        errors: dict[str, str] = {}
        values = {key: whole_number(form, key, lo, hi, key.replace("_", " ").capitalize(), errors)
                  for key, lo, hi in END_FIELDS}
        if ctx.rater.finished_at is not None:  # the study is finished for this rater
            recorded = {key: getattr(ctx.rater, key) for key, _, _ in END_FIELDS}
            if not errors and values == recorded:
                return RedirectResponse(f"/r/{token}/end", status_code=303)
            return site.page(request, "end.html.j2", 409, ctx=ctx, token=token, values=form,
                             errors={"trust_end": "These answers are already recorded and cannot "
                                             "be changed."})
        if site.next_url(s, token, ctx) != f"/r/{token}/end":  # not every case is read yet
            return RedirectResponse(site.next_url(s, token, ctx), status_code=303)
        if errors:
            return site.page(request, "end.html.j2", 422, ctx=ctx, token=token, values=form,
                             errors=errors)
        for key, value in values.items():
            setattr(ctx.rater, key, value)
        ctx.rater.finished_at = now()
    return RedirectResponse(f"/r/{token}/end", status_code=303)


def _aware(t):
    from datetime import UTC

    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
