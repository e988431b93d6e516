"""``pellucid serve`` probed as an attacker and a careless client would, as a real server in a
subprocess on 127.0.0.1: jobs run in worker processes (``/health`` answers while they run), a full
queue answers 503, a job over its time limit 504 (its worker is replaced), decompression bombs are
refused from the header with 413 naming the limit, non-finite pixels with 400, and no request
leaves an upload or an empty job folder behind. Results are private and expire; logs carry job
lines and no patient data; the server's peak memory over the whole suite stays bounded."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from tests import hostile

KEY = "s3cret-key"
RSS_BOUND_MB = 4096  # two workers running RISE take ~2.9 GB; one decoded 9000^2 bomb took ~7 GB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (MiB)."""
    total = 0.0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return 0.0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


class Server:
    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.results = root / "results"
        self.log = root / "server.log"
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = dict(os.environ, PELLUCID_API_KEY=KEY)
        cmd = [sys.executable, "-m", "pellucid.cli", "serve", "--models", str(self.root / "models"),
               "--out", str(self.results), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "2", "--queue", "1", "--job-timeout", "8", "--max-methods", "4"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        threading.Thread(target=self._sample, daemon=True).start()
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.log.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb(self.proc.pid))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(30)

    def client(self, key: str | bytes | None = KEY) -> httpx.Client:
        headers = {"X-API-Key": key} if key is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def job_folders(self) -> list[Path]:
        return sorted(p for p in self.results.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pellucid.models import build, save_model
    from pellucid.models.card import ModelCard

    root = tmp_path_factory.mktemp("hardening")
    card = ModelCard(arch="resnet18", task="classification", class_names=["A", "B", "C"],
                     in_channels=1, spatial_dims=2, input_size=[128, 128], activation="softmax",
                     backend="torchvision")
    save_model(root / "models" / "chest", build("resnet18", 2, 1, 3, backend="torchvision").module, card)
    broken = root / "models" / "broken"
    shutil.copytree(root / "models" / "chest", broken)
    (broken / "model.safetensors").write_bytes(b"not weights at all")
    srv = Server(root).start()
    yield srv
    srv.stop()


def _post(client: httpx.Client, name: str, data: bytes, methods: str = "gradcam",
          model: str = "chest") -> httpx.Response:
    return client.post("/v1/explain", files={"file": (name, data, "application/octet-stream")},
                       data={"model": model, "methods": methods})


def _png() -> bytes:
    return hostile.noise_png(128)


def test_health_answers_while_jobs_run_a_full_queue_gets_503_and_slow_jobs_504(server):
    answers: list[httpx.Response] = []

    def slow() -> None:
        with server.client() as c:
            answers.append(_post(c, "slow.png", _png(), "rise"))

    threads = [threading.Thread(target=slow) for _ in range(3)]  # 2 workers + 1 queued
    for t in threads:
        t.start()
    with server.client() as c:
        deadline = time.time() + 60
        while c.get("/health").json()["jobs_in_flight"] < 3 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the workers are busy explaining now
        latencies = []
        for _ in range(10):
            start = time.perf_counter()
            assert c.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
        full = _post(c, "more.png", _png())
    for t in threads:
        t.join(120)
    assert max(latencies) < 0.2, latencies
    assert full.status_code == 503 and full.headers["retry-after"], full.text
    assert sorted(a.status_code for a in answers) == [504, 504, 504], [a.text for a in answers]
    assert "job_timeout_s" in answers[0].json()["detail"]
    with server.client() as c:  # the killed workers were replaced
        ok = _post(c, "after.png", _png(), "gradcam,saliency")
    assert ok.status_code == 200, ok.text
    assert "over the time limit" in server.log.read_text()


@pytest.mark.parametrize("case", list(hostile.corpus(Path("/nonexistent"))))
def test_hostile_uploads_are_refused_and_leave_nothing_behind(server, case, tmp_path):
    name, data, expect = hostile.corpus(tmp_path)[case]
    before = server.job_folders()
    with server.client() as c:
        r = _post(c, name, data)
    detail = r.json()["detail"]
    assert "Traceback" not in r.text and name not in detail
    if name.endswith(".npy"):
        assert r.status_code == 400 and "not a DICOM" in detail  # not an upload type at all
    elif expect == "too large":
        assert r.status_code == 413, (case, r.text)
        assert any(k in detail for k in ("(max_pixels)", "(max_voxels)", "(max_frames)")), detail
    elif name.endswith((".nii", ".nii.gz")):  # a volume for the 2D model: refused from its header
        assert r.status_code == 422 and "2D model" in detail, (case, r.text)
    elif expect == "non-finite":
        assert r.status_code == 400 and "non-finite values" in detail, (case, r.text)
    else:
        assert r.status_code in (400, 422), (case, r.text)
    assert server.job_folders() == before
    assert not (tmp_path / "npy-marker").exists()
    with server.client() as c:
        assert c.get("/health").status_code == 200


def test_requests_that_are_refused_early_leave_nothing(server):
    before = server.job_folders()
    with server.client() as c:
        r = _post(c, "a.png", _png(), ",".join(["gradcam", "saliency", "lime", "rise", "occlusion"]))
        assert r.status_code == 400 and "at most 4 methods" in r.json()["detail"]
        many = ",".join(f"m{i}" for i in range(60))
        assert _post(c, "a.png", _png(), many).status_code == 400
        r = _post(c, "a.png", _png(), "gradcam", model="broken")  # weights that cannot load
        assert r.status_code == 503 and "cannot be loaded" in r.json()["detail"], r.text
        vol = hostile.nifti_bytes(np.ones((8, 8, 8), np.float32), gz=False)  # an uncompressed .nii
        r = _post(c, "v.nii", vol)
        assert r.status_code == 422 and "2D model" in r.json()["detail"], r.text
    assert server.job_folders() == before
    assert not list(server.results.rglob("input*"))


def test_secrets_of_any_characters_and_docs_behind_the_key(server):
    with server.client("ключ-é".encode()) as c:
        assert c.get("/v1/models").status_code == 401
        assert _post(c, "a.png", _png()).status_code == 401
    with server.client(None) as c:
        for path in ("/docs", "/openapi.json", "/v1/models"):
            assert c.get(path).status_code == 401, path
        assert c.get("/health").status_code == 200
    with server.client() as c:
        assert "/v1/explain" in c.get("/openapi.json").json()["paths"]
        assert c.get("/docs").status_code == 200


def test_results_are_private_deletable_and_no_patient_data_is_logged(server, shared_data):
    source = pydicom.dcmread(next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm")))
    source.PatientName = "Zyxwvut"  # single-part names: highdicom warns and quotes them
    source.ReferringPhysicianName = "Qponmlk"
    source.PatientID = "PID-778899"
    buf = io.BytesIO()
    source.save_as(buf, enforce_file_format=True)
    with server.client() as c:
        r = _post(c, "patient.dcm", buf.getvalue(), "gradcam")
        assert r.status_code == 200, r.text
        body = r.json()
        folder = server.results / body["job"]
        assert (folder.stat().st_mode & 0o777) == 0o700
        files = list(folder.iterdir())
        assert files and all((f.stat().st_mode & 0o777) == 0o600 for f in files)
        assert not any(f.name.startswith("input") for f in files)  # the upload is gone
        assert c.get(body["methods"][0]["overlay"]).status_code == 200
        assert c.delete(f"/v1/results/{body['job']}").status_code == 200
        assert not folder.exists()
        assert c.get(body["methods"][0]["overlay"]).status_code == 404
        assert c.delete(f"/v1/results/{body['job']}").status_code == 404
        assert c.delete("/v1/results/not-a-job!").status_code == 404
        assert c.delete("/v1/results/..%2F..").status_code in (404, 405)
        assert server.results.is_dir() and (server.root / "models" / "chest").is_dir()
    log = server.log.read_text()
    assert f"job {body['job']}: accepted" in log and f"job {body['job']}: done" in log
    for value in ("Zyxwvut", "Qponmlk", "PID-778899", "patient.dcm", "Doe", "Jane", "HOSTILE-1"):
        assert value not in log, value


def test_retention_removes_old_results_only(tmp_path):
    from pellucid.service.app import Retention

    old, new = tmp_path / "aaaa1111", tmp_path / "bbbb2222"
    for f in (old, new):
        f.mkdir()
        (f / "map.npy").write_bytes(b"x")
    two_days = time.time() - 2 * 86400
    os.utime(old, (two_days, two_days))
    assert Retention(tmp_path, hours=24).sweep(force=True) == 1
    assert not old.exists() and new.exists()
    assert Retention(tmp_path, hours=0).sweep(force=True) == 0  # 0 keeps results


def test_server_memory_stayed_bounded_over_the_suite(server):
    """Runs last in this module: the peak resident memory of the server and its workers while
    every request above (bombs included) was answered."""
    with server.client() as c:
        assert c.get("/health").status_code == 200
    assert 0 < server.peak_mb < RSS_BOUND_MB, f"peak {server.peak_mb:.0f} MiB"


# ---------------------------------------------------------------- second round

def _raw_request(server: Server, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def _read_until_closed(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (headers and body may arrive
    in separate packets)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks).decode(errors="replace")


def _multipart_head(server: Server, length: int | None, boundary: str = "b0undary") -> str:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST /v1/explain HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-API-Key: {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{size}")


@pytest.mark.parametrize("case", ["jpeg 2000 SIZ 40000^2", "rle 64 MB", "deflate 2 GB",
                                  "nifti 131 M voxels for a 2D model"])
def test_codestream_bombs_are_refused_by_the_server_before_any_worker(server, case):
    data, name = {
        "jpeg 2000 SIZ 40000^2": (lambda: hostile.jpeg2000_dicom(64, declare=40000), "a.dcm"),
        "rle 64 MB": (lambda: hostile.rle_bomb(64, 64), "b.dcm"),
        "deflate 2 GB": (lambda: hostile.deflate_bomb(2048), "c.dcm"),
        "nifti 131 M voxels for a 2D model": (lambda: hostile.nifti_declaring((512, 512, 500)),
                                              "d.nii.gz"),
    }[case]
    payload = data()
    before = server.job_folders()
    with server.client() as c:
        start = time.perf_counter()
        r = _post(c, name, payload)
        seconds = time.perf_counter() - start
    assert r.status_code in (413, 422), r.text
    assert seconds < 5, seconds
    detail = r.json()["detail"]
    assert "refused before decoding" in detail or "2D model" in detail, detail
    assert "/" not in detail.split(":")[0]  # the server-side path is never shown
    assert server.job_folders() == before


def test_fifty_slow_clients_do_not_keep_ten_valid_requests_from_an_answer(server):
    """Uploads that declare a body and never send it used to hold every worker and queue slot.
    Now a request is admitted only once its body has arrived: 50 clients hold their sockets open
    while 10 valid requests are each answered 200."""
    slow = []
    try:
        for _ in range(50):
            sock = _raw_request(server, _multipart_head(server, 5_000_000), b"--b0undary\r\n")
            slow.append(sock)
        time.sleep(0.5)
        with server.client() as c:
            codes = [_post(c, f"v{i}.png", _png()).status_code for i in range(10)]
            health = c.get("/health").json()
        assert codes == [200] * 10, codes
        assert health["jobs_in_flight"] == 0 and health["ready"] is True, health
    finally:
        for sock in slow:
            sock.close()


def test_a_slow_upload_gets_408_and_a_chunked_oversized_one_stops_at_the_limit(server, tmp_path):
    sock = _raw_request(server, _multipart_head(server, 100_000), b"--b0undary\r\n")
    sock.settimeout(60)
    start = time.perf_counter()
    reply = _read_until_closed(sock)
    sock.close()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "body_idle_s" in reply and time.perf_counter() - start < 40
    # a chunked upload of 200 MB against the 64 MB limit: refused as it streams, never spooled
    sent = 0
    sock = _raw_request(server, _multipart_head(server, None))
    chunk = b"\x00" * 2**20
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    try:
        while sent < 200 * 2**20:
            sock.sendall(framed)
            sent += len(chunk)
    except OSError:
        pass  # the server closed the connection after its answer
    sock.settimeout(30)
    reply = _read_until_closed(sock)
    sock.close()
    assert sent < 120 * 2**20, sent / 2**20
    assert reply == "" or reply.startswith("HTTP/1.1 413"), reply
    assert not list(server.results.rglob("input*"))


def test_ready_is_true_only_with_every_worker_warm(tmp_path):
    """``/ready`` answers 503 while the workers import and load models, 200 after; ``/health``
    answers throughout and says which."""
    from pellucid.models import build, save_model
    from pellucid.models.card import ModelCard

    card = ModelCard(arch="resnet18", task="classification", class_names=["A", "B"], in_channels=1,
                     spatial_dims=2, input_size=[64, 64], activation="softmax",
                     backend="torchvision")
    save_model(tmp_path / "models" / "chest", build("resnet18", 2, 1, 2,
                                                    backend="torchvision").module, card)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pellucid.cli", "serve", "--models",
                             str(tmp_path / "models"), "--out", str(tmp_path / "results"),
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: list[tuple[int, bool]] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:  # /ready read before and after /health: a pair read across the moment the
                # worker turned warm is not a disagreement, it is read again
                before = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if before != ready:
                continue
            seen.append((ready, health["ready"]))
            if ready == 200:
                break
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(30)
    assert seen and seen[-1] == (200, True), seen
    assert seen[0] == (503, False), seen  # answered before the worker was warm, and said so
    assert all((code == 200) == flag for code, flag in seen)
