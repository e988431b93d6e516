"""``pellucid node`` end to end with pynetdicom peers on 127.0.0.1: a sender routes a study to the
node by C-STORE, a storage SCP stands for the PACS that receives the results. Every result arrives
exactly once: through a duplicate study, a destination that is down and comes back, a node killed
(-9) right after acknowledging a study and again with results waiting, and a full spool (the sender
is told A700 and keeps the instance)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from pellucid.errors import ConfigError
from pellucid.pacs import c_store
from tests.test_pacs import orthanc  # noqa: F401 - the fixture

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A storage SCP (the PACS the node delivers to) that records every instance it is sent."""

    def __init__(self) -> None:
        self.port, self.got, self.server = _free_port(), [], None
        self._lock = threading.Lock()

    def start(self) -> Receiver:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title="DEST")
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event) -> int:
            ds = event.dataset
            with self._lock:
                self.got.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID)))
            return 0

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def _config(tmp: Path, model: str, receiver: Receiver, **extra) -> Path:
    port, http = _free_port(), _free_port()
    text = {
        "ae_title": "PELLUCID", "host": "127.0.0.1", "port": port, "http_port": http,
        "spool": str(tmp / "spool"), "settle_seconds": extra.pop("settle_seconds", 1),
        "retry": {"first_seconds": 0.5, "max_seconds": 2, "alert_after_seconds": 3},
        "destinations": {"pacs": {"cstore": {"host": "127.0.0.1", "port": receiver.port,
                                             "ae_title": "DEST"}}},
        "routes": [{"name": "chest", "match": {"modality": ["CR", "DX"], "body_part": ["CHEST"]},
                    "model": model, "methods": ["gradcam"], "destinations": ["pacs"]}], **extra}
    path = tmp / "node.yaml"
    path.write_text(json.dumps(text))  # (JSON is YAML)
    return path


def _settings(path: Path) -> dict:
    return json.loads(path.read_text())


def _metrics(path: Path) -> dict[str, float]:
    url = f"http://127.0.0.1:{_settings(path)['http_port']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _until(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds} s: {what}")


@pytest.fixture()
def study(shared_data, tmp_path):
    """A chest radiograph laid out like a hospital's (a real SIIM file's header, a phantom's
    pixels) and a CT image no route takes, in one study."""
    from tests.factories import phantom_dicom

    real = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    cr = pydicom.dcmread(phantom_dicom(real, tmp_path / "cr.dcm", seed=4))
    ct = pydicom.dcmread(shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm")
    ct.StudyInstanceUID = cr.StudyInstanceUID
    return [cr, ct]


def _expected(results: set[str]) -> None:
    """What one CR gives: the overlay (SC), the SEG, the SR (no PM: a CR has no frame of
    reference) and a KOS when a finding is present."""
    assert {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.66.4",
            "1.2.840.10008.5.1.4.1.1.88.34"} <= results <= {
        "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.66.4",
        "1.2.840.10008.5.1.4.1.1.88.34", KOS}, results


def test_a_routed_study_is_explained_and_every_result_delivered_once(chest_model, study, tmp_path):
    from pellucid.node import Node, load_node_config

    receiver = Receiver()  # the PACS is down when the study arrives
    path = _config(tmp_path, chest_model.source, receiver)
    node = Node(load_node_config(path)).start()
    try:
        assert c_store(study, "127.0.0.1", _settings(path)["port"], "PELLUCID") == [0, 0]
        _until(lambda: _metrics(path)["pellucid_node_alerts_total"] >= 1, 60,
               "an alert for the destination that is down")
        assert _metrics(path)["pellucid_node_retried_total"] >= 2
        assert _metrics(path)["pellucid_node_outbox"] >= 3
        receiver.start()  # back: the results arrive, once each
        _until(lambda: _metrics(path)["pellucid_node_outbox"] == 0, 60, "the outbox delivered")
        first = list(receiver.got)
        assert len({uid for uid, _ in first}) == len(first)
        _expected({cls for _, cls in first})
        m = _metrics(path)
        assert m["pellucid_node_received_total"] == 2 and m["pellucid_node_explained_total"] == 1
        assert m["pellucid_node_delivered_total"] == len(first)
        assert m["pellucid_node_refused_total"] == 1  # the CT: no route takes it
        # the same study routed again: explained again, nothing sent twice (the ledger)
        assert c_store(study, "127.0.0.1", _settings(path)["port"], "PELLUCID") == [0, 0]
        _until(lambda: _metrics(path)["pellucid_node_explained_total"] == 2, 60, "the repeat explained")
        time.sleep(1.5)
        assert receiver.got == first
        health = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{_settings(path)['http_port']}/health", timeout=10).read())
        assert health["status"] == "ok" and health["failing_destinations"] == []
    finally:
        node.stop()
        receiver.stop()
    audit = (tmp_path / "spool" / "audit.log").read_text()
    events = [json.loads(line)["event"] for line in audit.splitlines()]
    assert {"received", "explained", "retry", "alert", "delivered"} <= set(events)
    cr = study[0]
    for identifier in (str(cr.PatientName), str(cr.PatientID), str(cr.StudyInstanceUID),
                       str(cr.SOPInstanceUID)):
        assert identifier not in audit  # the audit log names studies by a reference only
    assert not list((tmp_path / "spool" / "work").iterdir())  # the received images are gone
    done = json.loads(next((tmp_path / "spool" / "done").glob("*.json")).read_text())
    assert done["refused"] == [{"modality": "CT", "reason": "no route takes this image"}]


def test_a_full_spool_answers_a700_and_loses_nothing(chest_model, study, tmp_path, monkeypatch):
    """A write that fails (ENOSPC) is never acknowledged: the sender gets A700 and keeps the
    instance; sent again once there is room, it is received."""
    import errno

    from pellucid.node import Node, load_node_config
    from pellucid.node import spool as spool_module

    receiver = Receiver().start()
    path = _config(tmp_path, chest_model.source, receiver)
    node = Node(load_node_config(path)).start()
    real = spool_module.write_whole

    def full(target, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        monkeypatch.setattr(spool_module, "write_whole", full)
        assert c_store(study[:1], "127.0.0.1", _settings(path)["port"], "PELLUCID") == [0xA700]
        m = _metrics(path)
        assert m["pellucid_node_received_total"] == 0 and m["pellucid_node_alerts_total"] == 1
        monkeypatch.setattr(spool_module, "write_whole", real)
        assert c_store(study[:1], "127.0.0.1", _settings(path)["port"], "PELLUCID") == [0]
        _until(lambda: len(receiver.got) >= 3 and _metrics(path)["pellucid_node_outbox"] == 0, 60,
               "the results delivered")
    finally:
        node.stop()
        receiver.stop()


def _start(path: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "pellucid.cli", "node", "--config", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = _settings(path)["http_port"]

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return True
        except OSError:
            return process.poll() is not None

    _until(up, 120, "the node started")
    assert process.poll() is None, process.stderr.read()[-2000:]
    return process


def test_killed_after_acknowledging_and_again_with_results_waiting(chest_model, study, tmp_path):
    """kill -9 right after the study is acknowledged (before it settled), then again while its
    results wait for a destination that is down: each restart resumes, and once the destination
    is back every result arrives exactly once."""
    receiver = Receiver()
    path = _config(tmp_path, chest_model.source, receiver, settle_seconds=4)
    node = _start(path)
    try:
        assert c_store(study, "127.0.0.1", _settings(path)["port"], "PELLUCID") == [0, 0]
        os.kill(node.pid, signal.SIGKILL)  # acknowledged, not yet explained
        node.wait()
        assert len(list((tmp_path / "spool" / "incoming").rglob("*.dcm"))) == 2
        node = _start(path)
        _until(lambda: _metrics(path)["pellucid_node_outbox"] >= 3, 120, "results waiting")
        os.kill(node.pid, signal.SIGKILL)  # results waiting for the destination, which is down
        node.wait()
        receiver.start()
        node = _start(path)
        _until(lambda: _metrics(path)["pellucid_node_outbox"] == 0, 120, "the outbox delivered")
        time.sleep(1.5)
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=60)
        receiver.stop()
    uids = [uid for uid, _ in receiver.got]
    assert len(set(uids)) == len(uids), "a result arrived twice"
    _expected({cls for _, cls in receiver.got})


def test_the_node_configuration_is_checked_before_it_starts(chest_model, tmp_path):
    from pellucid.node import load_node_config

    receiver = Receiver()
    path = _config(tmp_path, chest_model.source, receiver)
    settings = _settings(path)
    settings["routes"][0]["match"]["modality"] = ["CR", "MR"]
    path.write_text(json.dumps(settings))
    with pytest.raises(ConfigError) as exc:
        load_node_config(path)
    assert str(exc.value) == (f"{path}: routes[0].match.modality: MR outside the model's intended "
                              f"use (CR, DX)")
    settings["routes"][0]["match"] = {"body_part": ["CHEST"]}
    path.write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=r"match.modality: the model is for CR, DX only"):
        load_node_config(path)
    settings["routes"][0]["destinations"] = ["archive"]
    path.write_text(json.dumps({**settings, "portt": 1}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) portt"):
        load_node_config(path)
    path.write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=r"routes\[0\].destinations: archive not among"):
        load_node_config(path)
    settings["routes"][0].update(destinations=["pacs"],
                                 match={"modality": ["CR", "DX"], "body_part": ["CHEST"]})
    # a route's own options, checked as `pellucid explain` checks them
    for extra, said in (({"segmentation": "soft"}, "routes[0]: segmentation must be binary or "
                                                   "fractional, got 'soft'"),
                        ({"evidence": str(tmp_path)}, f"routes[0]: evidence {tmp_path}: not a "
                                                      f"pellucid bench run"),
                        ({"method": ["gradcam"]}, "routes[0]: unknown key(s) method")):
        path.write_text(json.dumps({**settings, "routes": [{**settings["routes"][0], **extra}]}))
        with pytest.raises(ConfigError) as exc:
            load_node_config(path)
        assert said in str(exc.value) and "\n" not in str(exc.value), exc.value
    path.write_text(json.dumps({**settings, "routes": [{**settings["routes"][0],
                                                        "segmentation": "fractional"}]}))
    route = load_node_config(path).routes[0]
    assert route.options().segmentation == "fractional" and route.options().methods == ["gradcam"]
    for key, value, said in (("port", "11112", "port: an integer of at least 1"),
                             ("settle_seconds", -1, "settle_seconds: a number of at least 0"),
                             ("retry", {"first_seconds": "soon"}, "retry.first_seconds: a number"),
                             ("retry", {"first_second": 1}, "retry: a mapping of")):
        path.write_text(json.dumps({**settings, key: value}))
        with pytest.raises(ConfigError) as exc:
            load_node_config(path)
        assert said in str(exc.value) and "\n" not in str(exc.value), exc.value


def test_orthanc_routes_a_study_to_the_node_and_gets_pm_seg_sr_and_kos_back(orthanc, shared_data,  # noqa: F811
                                                                              tmp_path):
    """A real PACS on both sides: Orthanc (in its private network namespace, where the node runs
    too) sends a CT study to the node's AE title by C-STORE (its REST call /modalities/.../store,
    as a routing rule would); the node (two workers, Orthanc's AE title the only one let in) is
    killed (-9) right after acknowledging it, and Orthanc is out of the node's reach for 60 s
    (a forwarder in front of its DICOM and HTTP ports, not yet started). Restarted, the node
    explains the study, retries, alerts, and once Orthanc is reachable stores the Parametric Map,
    SEG, SR, overlay and KOS into it by C-STORE and by STOW-RS (two destinations): each exactly
    once to each (Orthanc's instances, the node's counters)."""
    from tests.test_pacs import PASSWORD, URL, USER, _in_ns, _zoo

    model = _zoo(tmp_path / "ct", "resnet18", "classification", ["Nodule", "Mass"], size=128)
    card = json.loads((model / "card.json").read_text())
    # (random weights: the plumbing is tested; a threshold of 0.01 makes Nodule a present finding)
    card.update(thresholds=[0.01, 0.5], name="ct-nodule-demo", version="1.0")
    (model / "card.json").write_text(json.dumps(card))
    settings = {"ae_title": "PELLUCID", "host": "127.0.0.1", "port": 11112, "http_port": 8190,
                "spool": str(tmp_path / "spool"), "settle_seconds": 5, "workers": 2,
                "accept_from": ["ORTHANC"],
                "retry": {"first_seconds": 1, "max_seconds": 4, "alert_after_seconds": 20},
                "destinations": {"orthanc": {"cstore": {"host": "127.0.0.1", "port": 4243,
                                                        "ae_title": "ORTHANC"}},
                                 "web": {"stowrs": {"url": URL.replace(":8042", ":8043")}}},
                "routes": [{"name": "ct", "match": {"modality": ["CT"]}, "model": str(model),
                            "methods": ["gradcam"], "destinations": ["orthanc", "web"]}]}
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps(settings))
    ct = shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm"
    env = dict(os.environ, PELLUCID_PACS_USER=USER, PELLUCID_PACS_PASSWORD=PASSWORD)

    def start() -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", orthanc, sys.executable, "-m", "pellucid.cli",
                                 "node", "--config", str(path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)

    preamble = textwrap.dedent(f"""
        import base64, json, time, urllib.request
        import pydicom
        from pellucid.pacs import DicomWeb

        auth = {{"Authorization": "Basic " + base64.b64encode(b"{USER}:{PASSWORD}").decode()}}
        web = DicomWeb("{URL}", "{USER}", "{PASSWORD}")

        def rest(method, path, body=None):
            data = None if body is None else (body if isinstance(body, bytes)
                                              else json.dumps(body).encode())
            req = urllib.request.Request("http://127.0.0.1:8042" + path, data=data,
                                         method=method, headers=auth)
            return json.loads(urllib.request.urlopen(req, timeout=120).read() or b"null")

        def metrics():
            for _ in range(900):
                try:
                    text = urllib.request.urlopen("http://127.0.0.1:8190/metrics", timeout=1).read()
                    return {{line.split()[0]: float(line.split()[1]) for line in text.decode().splitlines()
                            if line and not line.startswith("#")}}
                except OSError:
                    time.sleep(0.2)
            raise SystemExit("the node did not answer")
    """)
    down_since = time.time()  # the forwarder is not running: Orthanc is out of the node's reach
    node, forwarder = start(), None
    try:
        study = _in_ns(orthanc, preamble + textwrap.dedent(f"""
            metrics()  # the node up
            ds = pydicom.dcmread("{ct}")
            web.store([ds])
            study = str(ds.StudyInstanceUID)
            rest("PUT", "/modalities/pellucid", {{"AET": "PELLUCID", "Host": "127.0.0.1",
                                                  "Port": 11112}})
            found = rest("POST", "/tools/lookup", study.encode())
            rest("POST", "/modalities/pellucid/store", found[0]["ID"].encode())  # acknowledged
            print(json.dumps({{"study": study}}))
        """), timeout=300)["study"]
        node.kill()  # kill -9: acknowledged, not yet settled
        node.wait(timeout=60)
        assert len(list((tmp_path / "spool" / "incoming").rglob("*.dcm"))) == 1
        node = start()
        waiting = _in_ns(orthanc, preamble + textwrap.dedent("""
            for _ in range(900):
                m = metrics()
                if m["pellucid_node_explained_total"] == 1 and m["pellucid_node_outbox"] == 10:
                    break
                time.sleep(0.2)
            print(json.dumps(m))
        """), timeout=300)
        assert waiting["pellucid_node_outbox"] == 10  # 5 results for each of 2 destinations
        time.sleep(max(0.0, 60 - (time.time() - down_since)))  # down for 60 s
        forwarder = subprocess.Popen(["ip", "netns", "exec", orthanc, sys.executable,
                                      str(Path(__file__).with_name("tcp_forward.py")),
                                      "4243:4242", "8043:8042"], stdout=subprocess.DEVNULL)
        seen = _in_ns(orthanc, preamble + textwrap.dedent(f"""
            down = metrics()
            classes = []
            for _ in range(600):
                classes = sorted(i["sop_class"] for i in web.instances("{study}"))
                m = metrics()
                if "1.2.840.10008.5.1.4.1.1.88.59" in classes and m["pellucid_node_outbox"] == 0:
                    break
                time.sleep(0.2)
            time.sleep(2)  # nothing more arrives
            classes = sorted(i["sop_class"] for i in web.instances("{study}"))
            print(json.dumps({{"classes": classes, "down": down, "after": metrics()}}))
        """), timeout=300)
    finally:
        for process in (node, forwarder):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
    classes = seen["classes"]
    assert classes.count("1.2.840.10008.5.1.4.1.1.2") == 1  # the CT, then what the node sent back
    for sop_class in ("1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.66.4",
                      "1.2.840.10008.5.1.4.1.1.88.34", KOS, "1.2.840.10008.5.1.4.1.1.7"):
        assert classes.count(sop_class) == 1, (sop_class, classes)  # PM, SEG, SR, KOS, overlay
    down, after = seen["down"], seen["after"]
    assert down["pellucid_node_alerts_total"] >= 1 and down["pellucid_node_retried_total"] >= 4
    assert after["pellucid_node_delivered_total"] == 10  # each result once to each destination
    assert after["pellucid_node_outbox"] == 0
    audit = [json.loads(line) for line in (tmp_path / "spool" / "audit.log").read_text().splitlines()]
    assert sum(e["event"] == "received" for e in audit) == 1  # once, before the kill
    assert {e["destination"] for e in audit if e["event"] == "alert"} >= {"orthanc", "web"}


def test_only_the_calling_ae_titles_let_in_may_send(chest_model, study, tmp_path):
    """``accept_from``: an association from another calling AE title is rejected (the sender is
    told; nothing is spooled); one from a title let in is taken."""
    from pellucid.errors import DataError
    from pellucid.node import Node, load_node_config

    receiver = Receiver()
    path = _config(tmp_path, chest_model.source, receiver, accept_from=["MODALITY1"], settle_seconds=60)
    node = Node(load_node_config(path, check_models=False)).start()
    try:
        port = _settings(path)["port"]
        with pytest.raises(DataError, match="association with PELLUCID was not accepted"):
            c_store(study, "127.0.0.1", port, "PELLUCID", calling_ae="INTRUDER")
        assert not (tmp_path / "spool" / "incoming").exists() or \
            not list((tmp_path / "spool" / "incoming").rglob("*.dcm"))
        assert c_store(study, "127.0.0.1", port, "PELLUCID", calling_ae="MODALITY1") == [0, 0]
        assert len(list((tmp_path / "spool" / "incoming").rglob("*.dcm"))) == 2
    finally:
        node.stop()
    path.write_text(json.dumps({**_settings(path), "accept_from": ["A" * 17]}))
    with pytest.raises(ConfigError, match=r"accept_from: 'AAAAAAAAAAAAAAAAA' is not an AE title"):
        load_node_config(path, check_models=False)


def test_a_corrupt_result_is_set_aside_with_an_alert_and_the_rest_delivered(chest_model, study,
                                                                           tmp_path):
    """An unforeseen failure (a result file that is not DICOM in the outbox) never stops the
    delivering thread: that folder is set aside in spool/failed/ with an alert naming the study,
    and a study routed afterwards is explained and delivered."""
    from pellucid.node import Node, load_node_config

    receiver = Receiver().start()
    path = _config(tmp_path, chest_model.source, receiver)
    broken = tmp_path / "spool" / "outbox" / "pacs" / "0123456789abcdef.1"
    broken.mkdir(parents=True)
    (broken / "1.2.3.dcm").write_bytes(b"not DICOM")
    node = Node(load_node_config(path)).start()
    try:
        _until(lambda: _metrics(path)["pellucid_node_alerts_total"] == 1, 30, "the alert")
        assert (tmp_path / "spool" / "failed" / "outbox" / "pacs" / broken.name / "1.2.3.dcm").is_file()
        assert c_store(study[:1], "127.0.0.1", _settings(path)["port"], "PELLUCID") == [0]
        _until(lambda: len(receiver.got) >= 3 and _metrics(path)["pellucid_node_outbox"] == 0, 60,
               "the next study delivered")
    finally:
        node.stop()
        receiver.stop()
    audit = (tmp_path / "spool" / "audit.log").read_text()
    assert '"event": "alert", "study": "0123456789abcdef"' in audit
