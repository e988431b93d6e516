"""The clinician review study: statistics against references, study creation (de-identified,
blinded), the 403 / CSRF / validation paths, 20 concurrent raters and a server restart on SQLite and
PostgreSQL, and a whole rater session driven in Debian's Chromium by Playwright."""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from pellucid.errors import ConfigError
from pellucid.review.analysis import (
    analyze,
    fleiss_kappa,
    krippendorff_alpha_ordinal,
    mcnemar_exact,
)
from pellucid.review.create import create_study, read_raters
from pellucid.review.db import Assignment, Base, Case, Rater, Rating, Read, Study, make_engine, migrate
from pellucid.review.security import hash_token

ROOT = Path(__file__).resolve().parents[1]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = "/usr/bin/chromium"


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (make system-deps installs it)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- statistics against references

def test_krippendorff_alpha_matches_the_reference_package():
    import krippendorff

    rng = np.random.default_rng(3)
    for _ in range(6):
        data = rng.integers(0, 11, size=(5, 30)).astype(float)
        data[1] = np.where(rng.random(30) < 0.7, data[0], data[1])
        data[rng.random(data.shape) < 0.15] = np.nan
        ours = krippendorff_alpha_ordinal(data)
        ref = krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal")
        assert ours == pytest.approx(ref, abs=1e-10)
    assert krippendorff_alpha_ordinal(np.array([[1, 2, 3], [1, 2, 3]], float)) == pytest.approx(1.0)


def test_fleiss_kappa_and_mcnemar_by_hand():
    # Fleiss (1971) worked example as given in the literature: 10 subjects, 14 raters -> 0.210
    counts = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
                       [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
                       [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert fleiss_kappa(counts) == pytest.approx(0.20993, abs=1e-4)
    first = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    second = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)  # 4 better, 0 worse: p = 2 * 0.5^4
    res = mcnemar_exact(first, second)
    assert (res["better"], res["worse"]) == (4, 0) and res["p_value"] == pytest.approx(0.125)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def review_run(tmp_path_factory) -> Path:
    from pellucid.bench import run_bench

    out = tmp_path_factory.mktemp("review_run")
    run_bench("review", out, progress=False)
    return out


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's binaries, trust auth for loopback),
    run as the ``postgres`` user when the tests run as root."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        _missing("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin)")
    bindir = bins[-1].parent
    root = Path(tempfile.mkdtemp(prefix="pellucid-pg-", dir="/tmp"))
    root.chmod(0o755)
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust",
                    "-U", "pellucid", "--no-sync"], check=True, capture_output=True)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"),
                    "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200",
                    "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://pellucid@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w",
                        "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


_DB_COUNTER = iter(range(10_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "review.db")
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"review_{os.getpid()}_{next(_DB_COUNTER)}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


class Server:
    """``pellucid review serve`` in a subprocess on 127.0.0.1."""

    def __init__(self, db: str) -> None:
        self.db, self.port, self.proc = db, _free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "pellucid.cli", "review", "serve", "--db",
                                      self.db, "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stdout.read().decode()[-3000:])
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("review server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def rate_session(base: str, token: str, finding: str = "yes", agreement: int = 7) -> int:
    """A whole rater session over HTTP; returns the number of explanation ratings submitted."""
    rated = 0
    with httpx.Client(base_url=base, follow_redirects=True, timeout=60) as c:
        r = c.get(f"/r/{token}")
        csrf = _csrf(r.text)
        r = c.post(f"/r/{token}/start", data={"csrf": csrf, "role": "radiologist",
                                              "years_experience": "8", "ai_familiarity": "3",
                                              "trust_start": "5", "willingness_start": "6"})
        while "/case/" in str(r.url):
            pos = int(str(r.url).rsplit("/", 1)[1])
            for stage in (1, 2, 3):
                data = {"csrf": csrf, "finding": finding, "confidence": str(2 + stage)}
                letters = sorted(set(re.findall(r'name="agreement_([A-Z])"', r.text)))
                if stage == 3:
                    data["comment"] = f"case {pos}"
                    if letters:
                        data["would_check"] = "yes"
                    for k, letter in enumerate(letters):
                        data |= {f"agreement_{letter}": str((agreement + k) % 11),
                                 f"spatial_{letter}": "4", f"usefulness_{letter}": "3",
                                 f"trust_{letter}": str(1 + k % 5)}
                    rated += len(letters)
                r = c.post(f"/r/{token}/case/{pos}/{stage}", data=data)
                assert r.status_code == 200, r.text[-500:]
        r = c.post(f"/r/{token}/end", data={"csrf": csrf, "trust_end": "6", "willingness_end": "7"})
        assert "Thank you" in r.text
    return rated


def _tokens(made) -> list[str]:
    return list(made.invitations.values())


# ---------------------------------------------------------------- creation

def test_study_is_deidentified_blinded_and_balanced(review_run, tmp_path):
    db = str(tmp_path / "s.db")
    made = create_study(review_run, db, ["r1", "r2"], cases=8, control=0.25, seed=1)
    engine = make_engine(db)
    with Session(engine) as s:
        study = s.get(Study, made.study_id)
        assert study.finding == "Nodule" and sorted(study.methods) == \
            ["gradcam", "integratedgradients", "saliency"]
        assert study.admin_token_hash == hash_token(made.admin_token)
        cases = list(s.scalars(select(Case)))
        assert len(cases) == 8 and [c.code for c in cases] == [f"C{i:03d}" for i in range(1, 9)]
        assert sum(c.truth for c in cases) == 4  # balanced positives and negatives
        assert all(c.image_png[:8] == b"\x89PNG\r\n\x1a\n" for c in cases)
        orders = {}
        for rater in s.scalars(select(Rater)):
            assert rater.token_hash == hash_token(made.invitations[rater.label])
            rows = list(s.scalars(select(Assignment).where(Assignment.rater_id == rater.id)
                                  .order_by(Assignment.position)))
            assert sorted(a.case_id for a in rows) == sorted(c.id for c in cases)
            for a in rows:
                assert sorted(a.order) == sorted(e.id for e in s.get(Case, a.case_id).explanations)
            orders[rater.label] = [a.case_id for a in rows]
        assert orders["r1"] != orders["r2"]  # each rater has an own random case order
    # nothing that identifies a case or a rater's token is stored in clear
    ids = set(pd.read_parquet(review_run / "results.parquet")["case_id"])
    with engine.connect() as conn:
        dump = " ".join(str(v) for table in Base.metadata.sorted_tables
                        for row in conn.execute(table.select()) for v in row
                        if not isinstance(v, bytes))
    assert not any(i in dump for i in ids)
    assert not any(t in dump for t in [made.admin_token, *_tokens(made)])
    engine.dispose()
    with pytest.raises(ConfigError, match="--methods: 'lime'"):
        create_study(review_run, str(tmp_path / "x.db"), ["a"], methods=["lime"])
    bad = tmp_path / "raters.txt"
    bad.write_text("a\nb\na\n")
    with pytest.raises(ConfigError, match="'a' listed twice"):
        read_raters(bad)


def test_migrations_match_the_models(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(str(tmp_path / "m.db"))
    migrate(engine)
    migrate(engine)  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff


# ---------------------------------------------------------------- security and validation

def test_forbidden_csrf_and_validation_paths(review_run, tmp_path):
    from fastapi.testclient import TestClient

    from pellucid.review.app import create_review_app

    db = str(tmp_path / "v.db")
    made = create_study(review_run, db, ["r1", "r2"], cases=3)
    t1, t2 = made.invitations["r1"], made.invitations["r2"]
    client = TestClient(create_review_app(db))
    r = client.get("/r/not-a-token")
    assert r.status_code == 403 and "invitation link is not valid" in r.text
    page = client.get(f"/r/{t1}")
    csrf1 = _csrf(page.text)
    csrf2 = _csrf(client.get(f"/r/{t2}").text)
    start = {"role": "resident", "years_experience": "2", "ai_familiarity": "2", "trust_start": "4",
             "willingness_start": "4"}
    assert client.post(f"/r/{t1}/start", data=start).status_code == 403  # no CSRF token
    r = client.post(f"/r/{t1}/start", data=start | {"csrf": csrf2})  # another rater's token
    assert r.status_code == 403 and "could not be verified" in r.text
    r = client.post(f"/r/{t1}/start", data=start | {"csrf": csrf1, "trust_start": "11"})
    assert r.status_code == 422 and "must be between 0 and 10, got 11" in r.text
    assert 'value="resident"' in r.text  # the rest of the answers stay in the form
    r = client.post(f"/r/{t1}/start", data=start | {"csrf": csrf1, "role": "<script>x</script>",
                                                    "years_experience": "-1"})
    assert "<script>x</script>" not in r.text and "&lt;script&gt;" in r.text  # escaped
    r = client.post(f"/r/{t1}/start", data=start | {"csrf": csrf1}, follow_redirects=True)
    assert r.status_code == 200 and r.url.path == f"/r/{t1}/case/1"
    bad = {"csrf": csrf1, "finding": "maybe", "confidence": "9"}
    r = client.post(f"/r/{t1}/case/1/1", data=bad)
    assert r.status_code == 422 and "answer yes or no" in r.text and \
        "Confidence: must be between 1 and 5, got 9" in r.text
    engine = make_engine(db)
    with Session(engine) as s:
        assert s.scalar(select(Read.finding1).limit(1)) is None  # nothing stored
    client.post(f"/r/{t1}/case/1/1", data={"csrf": csrf1, "finding": "no", "confidence": "3"})
    client.post(f"/r/{t1}/case/1/2", data={"csrf": csrf1, "finding": "no", "confidence": "3"})
    r = client.post(f"/r/{t1}/case/1/1", data={"csrf": csrf1, "finding": "yes", "confidence": "5"})
    assert r.status_code == 409 and "cannot be changed" in r.text  # own read is locked
    page = client.get(f"/r/{t1}/case/1").text
    letters = sorted(set(re.findall(r'name="agreement_([A-Z])"', page)))
    stage3 = {"csrf": csrf1, "finding": "yes", "confidence": "4", "would_check": "no"}
    for letter in letters:
        stage3 |= {f"agreement_{letter}": "5", f"spatial_{letter}": "3", f"usefulness_{letter}": "3",
                   f"trust_{letter}": "3"}
    if letters:
        r = client.post(f"/r/{t1}/case/1/3", data=stage3 | {f"agreement_{letters[0]}": "12"})
        assert r.status_code == 422 and f"{letters[0]}: agreement: must be between 0 and 10" in r.text
    client.post(f"/r/{t1}/case/1/3", data=stage3)
    client.post(f"/r/{t1}/case/1/3", data=stage3 | {f"agreement_{x}": "9" for x in letters})  # resubmit
    with Session(engine) as s:
        ratings = list(s.scalars(select(Rating)))
        assert len(ratings) == len(letters) and all(r.agreement == 9 for r in ratings)
        read = s.scalar(select(Read).where(Read.stage == 4))
        assert (read.finding1, read.finding2, read.finding3) == (False, False, True)
        assert read.seconds is not None and read.seconds >= 0
    assert client.get(f"/r/{t1}/case/99").status_code == 404
    assert client.get("/admin/progress").status_code == 403
    assert client.get("/admin/progress", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get("/admin/export/ratings.csv",
                      headers={"Authorization": f"Bearer {t1}"}).status_code == 403  # a rater token
    admin = {"Authorization": f"Bearer {made.admin_token}"}
    progress = client.get("/admin/progress", headers=admin).json()
    assert {r["rater"]: r["cases_done"] for r in progress["raters"]} == {"r1": 1, "r2": 0}
    exported = client.get("/admin/export/ratings.csv", headers=admin).text
    assert exported.splitlines()[0].startswith("rater,case,method,letter,agreement")
    invited = client.post("/admin/raters", json={"label": "r3"}, headers=admin).json()
    assert client.get(invited["link"]).status_code == 200
    assert client.post("/admin/raters", json={"label": "r3"}, headers=admin).status_code == 409
    engine.dispose()


# ---------------------------------------------------------------- concurrency and restart

def test_twenty_concurrent_raters_and_a_restart_lose_nothing(review_run, db_url, tmp_path):
    raters = [f"rater-{i:02d}" for i in range(20)]
    made = create_study(review_run, db_url, raters, cases=3, control=0.34, seed=2)
    server = Server(db_url).start()
    try:
        counts: dict[str, int] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(20)

        def one(label: str) -> None:
            try:
                barrier.wait(30)
                counts[label] = rate_session(server.url, made.invitations[label],
                                             finding="yes" if hash(label) % 2 else "no",
                                             agreement=int(label[-2:]) % 11)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(label,)) for label in raters]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors[0]
        expected_ratings = sum(counts.values())
        # the same stage-3 answers resubmitted concurrently update in place
        threads = [threading.Thread(target=rate_again, args=(server.url, made.invitations[label]))
                   for label in raters[:10]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        server.stop()
        server.start()  # a restart keeps everything
        admin = {"Authorization": f"Bearer {made.admin_token}"}
        progress = httpx.get(server.url + "/admin/progress", headers=admin, timeout=30).json()
        assert all(r["cases_done"] == 3 and r["finished"] for r in progress["raters"])
    finally:
        server.stop()
    engine = make_engine(db_url)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Read).where(Read.stage == 4)) == 60
        assert s.scalar(select(func.count()).select_from(Rating)) == expected_ratings
        controls = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.control))
        assert expected_ratings == (60 - controls) * 3
        assert s.scalar(select(func.count()).select_from(Rater).where(Rater.finished_at.isnot(None))) == 20
        dup = s.execute(text("SELECT assignment_id, explanation_id, COUNT(*) FROM rating "
                             "GROUP BY assignment_id, explanation_id HAVING COUNT(*) > 1")).all()
        assert dup == []
    engine.dispose()
    summary = analyze(db_url, tmp_path / "analysis", bench=review_run)
    agreement = {r["measure"]: r["value"] for r in summary["tables"]["agreement"]}
    assert not np.isnan(agreement["Fleiss kappa: own read"])
    assert not np.isnan(agreement["Krippendorff alpha (ordinal): agreement"])
    assert len(summary["tables"]["spearman"]) > 0
    assert "Clinician review" in (review_run / "report.html").read_text()


def rate_again(base: str, token: str) -> None:
    with httpx.Client(base_url=base, follow_redirects=True, timeout=60) as c:
        page = c.get(f"/r/{token}/case/1").text
        letters = sorted(set(re.findall(r'name="agreement_([A-Z])"', page)))
        data = {"csrf": _csrf(page), "finding": "yes", "confidence": "5"}
        if letters:
            data["would_check"] = "no"
        for letter in letters:
            data |= {f"agreement_{letter}": "10", f"spatial_{letter}": "5", f"usefulness_{letter}": "5",
                     f"trust_{letter}": "5"}
        assert c.post(f"/r/{token}/case/1/3", data=data).status_code == 200


# ---------------------------------------------------------------- a whole session in Chromium

def test_playwright_drives_a_rater_session_in_chromium(review_run, tmp_path):
    if not Path(CHROMIUM).exists():
        _missing(f"{CHROMIUM} not found")
    from playwright.sync_api import sync_playwright

    db = str(tmp_path / "pw.db")
    made = create_study(review_run, db, ["browser"], cases=2, seed=5)
    token = made.invitations["browser"]
    server = Server(db).start()
    shot = tmp_path / "rating_page.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1366, "height": 768})  # a laptop screen
            page.goto(f"{server.url}/r/{token}")
            page.wait_for_selector("#role:focus")  # autofocus: the keyboard starts in the form
            page.keyboard.type("radiologist")
            page.fill("#years_experience", "12")
            for name, value in (("ai_familiarity", "4"), ("trust_start", "6"),
                                ("willingness_start", "7")):
                page.check(f"input[name={name}][value='{value}']")
            page.focus("#years_experience")
            page.keyboard.press("Enter")  # keyboard only: Enter in a field submits the form
            page.wait_for_url(re.compile(r"/case/1$"))
            for position in (1, 2):
                page.check("input[name=finding][value=yes]")
                page.check("input[name=confidence][value='3']")
                page.click("#next")
                page.wait_for_selector("text=AI prediction")
                page.check("input[name=confidence][value='4']")
                page.click("#next")
                page.wait_for_selector("text=Explanations")
                page.fill("input[data-opacity]", "40")
                page.fill("input[data-zoom='.grid .viewer']", "150")
                opacity = page.eval_on_selector(".grid img.overlay", "e => e.style.opacity")
                assert opacity == "0.4"
                for letter in "ABC":
                    page.check(f"input[name=agreement_{letter}][value='8']")
                    for f in ("spatial", "usefulness", "trust"):
                        page.check(f"input[name={f}_{letter}][value='4']")
                page.check("input[name=would_check][value=no]")
                page.fill("#comment", f"checked in the browser, case {position}")
                if position == 1:
                    page.screenshot(path=str(shot), full_page=True)
                page.click("#next")
                page.wait_for_load_state()
            page.wait_for_url(re.compile(r"/end$"))
            page.check("input[name=trust_end][value='7']")
            page.check("input[name=willingness_end][value='8']")
            page.click("#finish")
            page.wait_for_selector("text=Thank you")
            browser.close()
    finally:
        server.stop()
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"
    engine = make_engine(db)
    with Session(engine) as s:
        rater = s.scalar(select(Rater))
        assert (rater.role, rater.years_experience, rater.trust_start, rater.trust_end) == \
            ("radiologist", 12, 6, 7)
        reads = list(s.scalars(select(Read)))
        assert len(reads) == 2 and all(r.stage == 4 and r.finding3 and r.confidence3 == 4
                                       and r.confidence1 == 3 for r in reads)
        ratings = list(s.scalars(select(Rating)))
        assert len(ratings) == 6 and {r.agreement for r in ratings} == {8}
    engine.dispose()


def test_the_review_tutorial_runs_as_written(review_run, tmp_path):
    """docs/tutorial-review.md's commands as written, in a temporary folder: the benchmark (the
    fixture's run copied to runs/review, so the command resumes it with nothing left to do), the
    study, the server in the background, two raters' sessions by HTTP, the analysis."""
    import shlex

    page = (ROOT / "docs" / "tutorial-review.md").read_text()
    commands = [line for block in re.findall(r"```bash\n(.*?)```", page, flags=re.S)
                for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert [c.split()[:3] for c in commands if c.startswith("pellucid")] == [
        ["pellucid", "bench", "review"], ["pellucid", "review", "create"],
        ["pellucid", "review", "serve"], ["pellucid", "review", "analyze"]]
    shutil.copytree(review_run, tmp_path / "runs" / "review")
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    server = None
    try:
        for command in commands:
            if command.endswith("&"):  # the server: until the raters are done
                args = shlex.split(command[:-1])
                port = int(args[args.index("--port") + 1])
                server = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
                _wait_for(f"http://127.0.0.1:{port}/", server)
                links = {r["rater"]: r["link"]
                         for r in csv.DictReader((tmp_path / "invitations.csv").open())}
                assert set(links) == {"reader1", "reader2"}
                assert oct((tmp_path / "invitations.csv").stat().st_mode)[-3:] == "600"
                for link in links.values():
                    base, token = link.rsplit("/r/", 1)
                    rate_session(base, token)
                continue
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, (command, done.stderr[-3000:])
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
    out = tmp_path / "review_analysis"
    by_method = pd.read_csv(out / "tables" / "ratings_by_method.csv")
    assert set(by_method["method"]) == {"gradcam", "saliency"}
    assert (by_method["n"] == 4).all()  # 2 raters x 2 cases per method
    for table in ("accuracy", "mcnemar", "trust", "agreement", "spearman"):
        assert (out / "tables" / f"{table}.csv").is_file(), table
    assert not pd.read_csv(out / "tables" / "spearman.csv").empty
    assert (out / "export" / "ratings.csv").is_file()
    assert "Clinician review" in (tmp_path / "runs" / "review" / "report.html").read_text()


def _wait_for(url: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode()[-3000:])
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


# ---------------------------------------------------------------- hardening

def _finish_one_case(client, token: str, csrf: str, comment: str) -> None:
    """Stages 1-3 of case 1 (the study has one case)."""
    page = client.get(f"/r/{token}/case/1").text
    for stage in (1, 2):
        client.post(f"/r/{token}/case/1/{stage}", data={"csrf": csrf, "finding": "no",
                                                        "confidence": "3"})
    page = client.get(f"/r/{token}/case/1").text
    letters = sorted(set(re.findall(r'name="agreement_([A-Z])"', page)))
    stage3 = {"csrf": csrf, "finding": "yes", "confidence": "4", "comment": comment}
    if letters:
        stage3["would_check"] = "no"
    for letter in letters:
        stage3 |= {f"agreement_{letter}": "5", f"spatial_{letter}": "3", f"usefulness_{letter}": "3",
                   f"trust_{letter}": "3"}
    r = client.post(f"/r/{token}/case/1/3", data=stage3, follow_redirects=True)
    assert r.status_code == 200 and r.url.path == f"/r/{token}/end", r.text[-300:]


def test_questionnaires_are_locked_once_answered(review_run, db_url):
    """A replayed start or end questionnaire cannot change recorded answers (409), on SQLite and
    PostgreSQL; replaying the same answers changes nothing either."""
    from fastapi.testclient import TestClient

    from pellucid.review.app import create_review_app

    made = create_study(review_run, db_url, ["r1"], cases=1)
    token = made.invitations["r1"]
    app = create_review_app(db_url)
    client = TestClient(app, follow_redirects=False)
    csrf = _csrf(client.get(f"/r/{token}").text)
    start = {"csrf": csrf, "role": "radiologist", "years_experience": "8", "ai_familiarity": "3",
             "trust_start": "5", "willingness_start": "6"}
    assert client.post(f"/r/{token}/start", data=start).status_code == 303
    r = client.post(f"/r/{token}/start", data=start | {"trust_start": "0"})
    assert r.status_code == 409 and "cannot be changed" in r.text
    assert client.post(f"/r/{token}/start", data=start).status_code == 303  # same answers
    r = client.post(f"/r/{token}/end", data={"csrf": csrf, "trust_end": "5", "willingness_end": "5"})
    assert r.status_code == 303 and r.headers["location"].endswith("/case/1")  # not yet: cases first
    _finish_one_case(client, token, csrf, "fine")
    end = {"csrf": csrf, "trust_end": "5", "willingness_end": "7"}
    assert client.post(f"/r/{token}/end", data=end).status_code == 303
    r = client.post(f"/r/{token}/end", data=end | {"trust_end": "0"})  # the replay from the issue
    assert r.status_code == 409 and "cannot be changed" in r.text
    assert client.post(f"/r/{token}/end", data=end).status_code == 303
    with Session(app.state.engine) as s:
        rater = s.scalar(select(Rater))
        assert (rater.trust_start, rater.trust_end, rater.willingness_end) == (5, 5, 7)
    app.state.engine.dispose()


def test_exports_neutralise_spreadsheet_formulas_and_keep_the_text(review_run, tmp_path):
    from fastapi.testclient import TestClient

    from pellucid.review.app import create_review_app
    from pellucid.review.security import neutralise_cell, recover_cell

    hostile_texts = ["=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)",
                     "\tTAB", "\rCR", "'quoted", "plain text"]
    for text_ in hostile_texts:
        assert recover_cell(neutralise_cell(text_)) == text_
        assert not str(neutralise_cell(text_)).startswith(("=", "+", "-", "@", "\t", "\r"))
    db = str(tmp_path / "f.db")
    made = create_study(review_run, db, ["r1"], cases=1)
    admin = {"Authorization": f"Bearer {made.admin_token}"}
    app = create_review_app(db)
    client = TestClient(app)
    token = client.post("/admin/raters", json={"label": "=1+1"}, headers=admin).json()["link"]
    token = token.rsplit("/", 1)[1]
    csrf = _csrf(client.get(f"/r/{token}").text)
    client.post(f"/r/{token}/start", data={"csrf": csrf, "role": "@SUM(A1)", "years_experience": "1",
                                           "ai_familiarity": "1", "trust_start": "1",
                                           "willingness_start": "1"})
    _finish_one_case(client, token, csrf, hostile_texts[0])
    cells = []
    for table in ("raters", "reads"):
        exported = client.get(f"/admin/export/{table}.csv", headers=admin).text
        rows = list(csv.reader(exported.splitlines()))
        cells += [c for row in rows[1:] for c in row]
        assert not any(c.startswith(("=", "+", "@", "\t", "\r")) for c in cells), exported
    assert neutralise_cell(hostile_texts[0]) in cells and "'=1+1" in cells and "'@SUM(A1)" in cells
    analyze(db, tmp_path / "analysis")
    on_disk = [c for f in (tmp_path / "analysis" / "export").glob("*.csv")
               for row in csv.reader(f.read_text().splitlines()) for c in row]
    assert "'=1+1" in on_disk and not any(c.startswith(("=", "+", "@")) for c in on_disk)
    app.state.engine.dispose()


def test_odd_secrets_are_refused_and_admin_checks_auth_before_the_body(review_run, tmp_path):
    from fastapi.testclient import TestClient

    from pellucid.review.app import create_review_app

    db = str(tmp_path / "s.db")
    made = create_study(review_run, db, ["r1"], cases=1)
    token = made.invitations["r1"]
    app = create_review_app(db)
    client = TestClient(app, raise_server_exceptions=False)
    form = {"csrf": "ключ-é-\u2028", "role": "x", "years_experience": "1", "ai_familiarity": "1",
            "trust_start": "1", "willingness_start": "1"}
    assert client.post(f"/r/{token}/start", data=form).status_code == 403  # not a 500
    assert client.get("/r/ключ").status_code == 403
    odd = {"Authorization": b"Bearer " + "ключ".encode()}
    assert client.get("/admin/progress", headers=odd).status_code == 403
    # no credentials and a body that is not JSON: refused for the credentials, never parsed
    r = client.post("/admin/raters", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 403 and "invalid admin token" in r.text
    admin = {"Authorization": f"Bearer {made.admin_token}"}
    r = client.post("/admin/raters", content=b"{not json", headers=admin)
    assert r.status_code == 422
    assert client.post("/admin/raters", json=["a"], headers=admin).status_code == 422
    assert client.post("/admin/raters", json={"label": "x\ny"}, headers=admin).status_code == 422
    app.state.engine.dispose()


def test_security_headers_and_a_limit_on_failed_tokens(review_run, tmp_path):
    from fastapi.testclient import TestClient

    from pellucid.review.app import SECURITY_HEADERS, create_review_app
    from pellucid.review.security import FailureLimiter

    db = str(tmp_path / "h.db")
    made = create_study(review_run, db, ["r1"], cases=1)
    token = made.invitations["r1"]
    app = create_review_app(db, FailureLimiter(limit=5, window=60))
    client = TestClient(app)
    for path in ("/", f"/r/{token}", f"/r/{token}/case/1", "/static/review.js"):
        r = client.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        if path.startswith("/r/"):
            assert r.headers["cache-control"] == "no-store"
    assert {k.lower() for k in SECURITY_HEADERS} <= set(client.get("/").headers)
    page = client.get(f"/r/{token}").text
    assert "<script>" not in page and "style=" not in page  # nothing inline that the CSP blocks
    # a rater's own stale forms (a wrong CSRF token) count against her token, 1/5 each, never
    # against the address others share
    for _ in range(6):
        assert client.post(f"/r/{token}/start", data={"csrf": "stale"}).status_code == 403
    assert client.get("/r/guess-x").status_code == 403  # the address is not locked by them
    for i in range(4):
        assert client.get(f"/r/guess-{i}").status_code == 403
    r = client.get("/r/guess-9")  # five wrong tokens from this address: locked out
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert client.get("/admin/progress").status_code == 429
    # a real rater behind the same (shared) address still gets her pages
    assert client.get(f"/r/{token}").status_code == 200
    assert client.get("/").status_code == 200  # pages without tokens stay up
    for _ in range(19):  # her token's own limit (5 x 5 stale forms) is separate and higher
        client.post(f"/r/{token}/start", data={"csrf": "stale"})
    assert client.get(f"/r/{token}").status_code == 429
    app.state.engine.dispose()


def test_x_forwarded_for_is_honoured_only_from_configured_proxies(review_run, tmp_path):
    """From 127.0.0.1 any X-Forwarded-For used to choose the address the limiter counted; now
    ``pellucid review serve`` ignores the header unless --trusted-proxy names the sender."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    db = str(tmp_path / "x.db")
    create_study(review_run, db, ["r1"], cases=1)
    for trusted, expect_locked in ((None, True), ("127.0.0.1", False)):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "pellucid.cli", "review", "serve", "--db", db, "--port",
               str(port)] + (["--trusted-proxy", trusted] if trusted else [])
        env = {k: v for k, v in os.environ.items() if k != "FORWARDED_ALLOW_IPS"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    httpx.get(url + "/", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            codes = [httpx.get(f"{url}/r/guess-{i}", headers={"X-Forwarded-For": f"10.0.0.{i}"},
                               timeout=5).status_code for i in range(25)]
        finally:
            proc.terminate()
            proc.wait(30)
        assert (429 in codes) is expect_locked, (trusted, codes)
