"""The study owner's API, authenticated by ``Authorization: Bearer <admin token>``: progress per
rater, inviting a rater (a new secret link), and the study's tables as CSV with spreadsheet
formulas neutralised."""

from __future__ import annotations

import csv
import io

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select

from pellucid.review.db import Assignment, Rater, Read
from pellucid.review.security import neutralised
from pellucid.review.site import site_of

router = APIRouter()


@router.get("/admin/progress")
def progress(request: Request) -> Response:
    site = site_of(request)
    with site.make_session() as s:
        study = site.admin_study(s, request)
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


@router.post("/admin/raters")
async def invite(request: Request) -> Response:
    site = site_of(request)
    with site.make_session() as s:  # authentication first, then the body
        study = site.admin_study(s, request)
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
        token = add_rater(site.db, study_id, label)
    except ConfigError as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    return JSONResponse({"label": label, "link": f"/r/{token}"})


@router.get("/admin/export/{table}.csv")
def export(request: Request, table: str) -> Response:
    site = site_of(request)
    from pellucid.review.analysis import load_tables

    with site.make_session() as s:
        study = site.admin_study(s, request)
        if study is None:
            return JSONResponse({"error": "invalid admin token"}, status_code=403)
        study_id = study.id
    tables = load_tables(site.engine, study_id)
    if table not in tables:
        return JSONResponse({"error": f"unknown table; available: {', '.join(tables)}"},
                            status_code=404)
    buf = io.StringIO()
    neutralised(tables[table]).to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
    return Response(buf.getvalue(), media_type="text/csv")

