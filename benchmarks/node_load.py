"""``pellucid node`` under load: N studies (one chest radiograph each, a real SIIM file's header
with a phantom's pixels and new UIDs) routed at once by 8 senders over C-STORE, the results
delivered to a pynetdicom storage SCP on loopback. Prints how long receiving and delivering took,
and checks that none is lost: every study's SR arrives, and no result arrives twice.

    .venv/bin/python benchmarks/node_load.py                 # 200 studies, the demo's chest model
    .venv/bin/python benchmarks/node_load.py --studies 20    # a quick look
    .venv/bin/python benchmarks/node_load.py --outage 60     # the destination down for the first 60 s
    .venv/bin/python benchmarks/node_load.py --workers 2     # two studies explained at once

The model is demo_out/models/chest-resnet18 when `make demo` made it, else one trained here on
phantoms (about 15 s).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.factories import phantom_dicom  # noqa: E402 (the tests' hospital-like radiograph)
from tests.test_node import Receiver, _config, _metrics, _settings  # noqa: E402


def _model(tmp: Path) -> str:
    demo = ROOT / "demo_out" / "models" / "chest-resnet18"
    if (demo / "card.json").is_file():
        return str(demo)
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, save_model, train

    opts = {"size": 64}
    result = train(open_dataset("phantom-chest", split="train", n=256, **opts),
                   TrainConfig(arch="resnet18", epochs=2, batch_size=32, progress=False, seed=0),
                   open_dataset("phantom-chest", split="val", n=64, **opts))
    save_model(tmp / "chest", result.module, result.card)
    return str(tmp / "chest")


def main() -> None:
    import os

    import pydicom
    from pydicom.uid import generate_uid

    from pellucid.node import Node, load_node_config
    from pellucid.pacs import c_store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--outage", type=float, default=0.0,
                        help="seconds the destination is down after the first study is sent")
    parser.add_argument("--workers", type=int, default=1, help="the node's explaining workers")
    args = parser.parse_args()
    data = Path(os.environ.get("PELLUCID_DATA", ROOT.parent / "shared" / "data"))
    real = next((data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        template = pydicom.dcmread(phantom_dicom(real, tmp / "cr.dcm", seed=4))
        studies = []
        for _ in range(args.studies):
            ds = copy.deepcopy(template)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            studies.append(ds)
        receiver = Receiver() if args.outage else Receiver().start()
        path = _config(tmp, _model(tmp), receiver, settle_seconds=2, workers=args.workers)
        node = Node(load_node_config(path)).start()
        port = _settings(path)["port"]
        try:
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda ds: c_store([ds], "127.0.0.1", port, "PELLUCID")[0],
                                         studies))
            received = time.perf_counter() - start
            refused = sum(s != 0 for s in statuses)
            print(f"{args.workers} worker(s) on {os.cpu_count()} cores", flush=True)
            print(f"{args.studies} studies sent by 8 senders in {received:.1f} s "
                  f"({args.studies / received:.1f} studies/s acknowledged), {refused} refused")
            deadline = time.time() + 60 * 60
            while time.time() < deadline:
                if receiver.server is None and time.perf_counter() - start >= args.outage:
                    receiver.start()
                    print(f"destination up after {time.perf_counter() - start:.0f} s", flush=True)
                m = _metrics(path)
                if m["pellucid_node_explained_total"] + m["pellucid_node_refused_total"] >= \
                        args.studies and m["pellucid_node_outbox"] == 0 and \
                        m["pellucid_node_incoming"] == 0:
                    break
                if int(time.time()) % 10 == 0:
                    print({k.removeprefix("pellucid_node_"): int(v) for k, v in m.items()}, flush=True)
                time.sleep(1)
            total = time.perf_counter() - start
            m = _metrics(path)
        finally:
            node.stop()
            receiver.stop()
        uids = [uid for uid, _ in receiver.got]
        reports = sum(cls == "1.2.840.10008.5.1.4.1.1.88.34" for _, cls in receiver.got)
        print(f"all delivered in {total:.1f} s ({args.studies / total:.2f} studies/s end to end): "
              f"{len(uids)} results, {reports} SRs for {args.studies} studies, "
              f"{len(uids) - len(set(uids))} delivered twice")
        print(json.dumps({k.removeprefix("pellucid_node_"): v for k, v in m.items()}))
        lost = args.studies - reports
        if lost or len(uids) != len(set(uids)) or refused:
            raise SystemExit(f"LOST {lost} studies, {len(uids) - len(set(uids))} duplicates, "
                             f"{refused} refused")


if __name__ == "__main__":
    main()
