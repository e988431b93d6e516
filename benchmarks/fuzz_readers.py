"""Fuzzing campaign over the readers added since the first hardening round: COCO JSON, CSV boxes,
safetensors weights, ONNX black boxes and benchmark run folders (read as ``--evidence``).

Each family starts from a valid file made here and tries ``--n`` mutants (bytes flipped,
inserted or cut; JSON values replaced by hostile ones: NaN, Inf, negatives, huge numbers, wrong
types, missing keys). A mutant must end cleanly: read correctly, or refused by a
:class:`pellucid.errors.PellucidError` whose message is one line. Anything else (another
exception, a multi-line message, a crash of the process) is unclean and printed.

    python benchmarks/fuzz_readers.py --n 500          # the campaign; prints a table
    python benchmarks/fuzz_readers.py --n 30 --json    # what tests/test_hostile_inputs.py runs
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import random
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

HOSTILE_VALUES = [float("nan"), float("inf"), -float("inf"), -1, 0, 1e308, -1e308, 2**63, "",
                  "x", None, True, [], {}, [1, 2, 3], {"a": 1}, "1" * 5000, -0.5, 1.5]
HOSTILE_TEXT = ["nan", "inf", "-inf", "-1", "0", "1e309", "", "abc", "0x10", " 3 ", "1" * 400,
                "-0", "1,2", "\x00", "é", "=1+1", "1e-320"]


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    """Flip, insert, delete or truncate a few bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(["flip", "insert", "delete", "truncate", "byte"])
        if not out:
            break
        i = rng.randrange(len(out))
        if op == "flip":
            out[i] ^= 1 << rng.randrange(8)
        elif op == "insert":
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == "delete":
            del out[i:i + rng.randint(1, 8)]
        elif op == "truncate":
            del out[i:]
        else:
            out[i] = rng.randrange(256)
    return bytes(out)


def _paths(node, path: list):
    """Every path (list of keys) into a JSON value, the root first."""
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, [*path, k])
    elif isinstance(node, list):
        for k, v in enumerate(node):
            yield from _paths(v, [*path, k])


def mutate_json(value, rng: random.Random):
    """A copy of a JSON value with one to three leaves replaced, keys removed or types changed."""
    value = copy.deepcopy(value)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(value, [])))
        if not path:
            value = copy.deepcopy(rng.choice(HOSTILE_VALUES))
            continue
        parent = value
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if isinstance(parent, dict) and rng.random() < 0.3:
            del parent[key]
        else:
            parent[key] = copy.deepcopy(rng.choice(HOSTILE_VALUES))  # never the shared object
    return value


# ---------------------------------------------------------------- the families

def coco_family(root: Path) -> tuple[Callable[[random.Random, Path], None], str]:
    from PIL import Image

    from pellucid.data.coco import COCODataset

    Image.fromarray(np.zeros((48, 64), np.uint8)).save(root / "a.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "b.png")
    base = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "categories": [{"id": 3, "name": "nodule"}, {"id": 4, "name": "mass"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [4, 5, 10, 12]},
                            {"id": 8, "image_id": 2, "category_id": 4, "bbox": [1, 1, 30, 20],
                             "segmentation": [[1, 1, 20, 1, 20, 20]]}]}

    def one(rng: random.Random, path: Path) -> None:
        text = json.dumps(mutate_json(base, rng))
        path.write_bytes(flip_bytes(text.encode(), rng) if rng.random() < 0.3 else text.encode())
        dataset = COCODataset(path, images=root)
        for i in range(len(dataset)):
            dataset[i]
    return one, "coco.json"


def csv_family(root: Path) -> tuple[Callable[[random.Random, Path], None], str]:
    from PIL import Image

    from pellucid.data.folders import CSVDataset

    Image.fromarray(np.zeros((48, 64), np.uint8)).save(root / "a.png")
    rows = [["path", "label", "x0", "y0", "x1", "y1"], ["a.png", "nodule", "4", "5", "20", "30"],
            ["a.png", "nodule", "30", "2", "60", "40"]]

    def one(rng: random.Random, path: Path) -> None:
        table = [list(r) for r in rows]
        for _ in range(rng.randint(1, 3)):
            r, c = rng.randrange(len(table)), rng.randrange(6)
            table[r][c] = rng.choice(HOSTILE_TEXT)
        buf = io.StringIO()
        csv.writer(buf).writerows(table)
        data = buf.getvalue().encode("utf-8", "surrogateescape")
        path.write_bytes(flip_bytes(data, rng) if rng.random() < 0.3 else data)
        fmt = rng.choice(["xyxy", "xywh", "yolo", "fractions"])
        dataset = CSVDataset(path, columns={"box": ["x0", "y0", "x1", "y1"]}, box_format=fmt)
        for i in range(len(dataset)):
            dataset[i]
    return one, "boxes.csv"


def safetensors_family(root: Path) -> tuple[Callable[[random.Random, Path], None], str]:
    import torch
    from safetensors.torch import save_file

    from pellucid.models.store import _load_state, _read_state_dict

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2))
    net(torch.zeros(1, 1, 8, 8))
    buf = root / "valid.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(buf),
              metadata={"aliases": "{}"})
    valid = buf.read_bytes()

    def one(rng: random.Random, path: Path) -> None:
        data = valid
        if rng.random() < 0.5:  # the JSON header
            size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + size])
            text = json.dumps(mutate_json(header, rng)).encode()
            data = len(text).to_bytes(8, "little") + text + data[8 + size:]
        else:
            data = flip_bytes(data, rng)
        path.write_bytes(data)
        state = _read_state_dict(path)
        _load_state(copy.deepcopy(net), state, path)
    return one, "w.safetensors"


def onnx_family(root: Path) -> tuple[Callable[[random.Random, Path], None], str]:
    import torch

    from pellucid.models.blackbox import load_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2)).eval()
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 1, 16, 16),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    valid = buf.getvalue()

    def one(rng: random.Random, path: Path) -> None:
        path.write_bytes(flip_bytes(valid, rng))
        model = load_onnx(path)
        model(torch.zeros(2, 1, 16, 16))
    return one, "m.onnx"


def run_folder_family(root: Path) -> tuple[Callable[[random.Random, Path], None], str]:
    from pellucid.bench import parse_config, run_bench
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, load_model, save_model, train
    from pellucid.pipeline.evidence import load_evidence

    result = train(open_dataset("phantom-chest", split="train", n=64, size=64),
                   TrainConfig(epochs=1, batch_size=32, progress=False))
    folder = save_model(root / "chest", result.module, result.card)
    cfg = parse_config({
        "name": "fuzz", "seed": 0, "batch_size": 3, "gallery": 0,
        "datasets": {"chest": {"reader": "phantom-chest", "cases": 3, "options": {"size": 64}}},
        "models": {"r18": {"datasets": ["chest"], "path": str(folder)}},
        "methods": ["gradcam"], "metrics": ["pointing_game"]})
    run_bench(cfg, root / "run", progress=False, report=False)
    loaded = load_model(folder)
    files = sorted(p for p in (root / "run").rglob("*") if p.is_file()
                   and p.suffix in (".json", ".parquet", ".tag"))

    def one(rng: random.Random, path: Path) -> None:
        run = path.with_suffix("")
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(root / "run", run)
        for _ in range(rng.randint(1, 2)):
            target = run / rng.choice(files).relative_to(root / "run")
            data = target.read_bytes()
            if target.suffix == ".json" and rng.random() < 0.6:
                try:
                    data = json.dumps(mutate_json(json.loads(data), rng)).encode()
                except ValueError:
                    data = flip_bytes(data, rng)
            else:
                data = flip_bytes(data, rng)
            target.write_bytes(data)
        for unverified in (False, True):
            try:
                load_evidence(run, loaded, ["gradcam"], unverified=unverified)
            except Exception as exc:
                if unverified:
                    raise
                from pellucid.errors import PellucidError

                if not isinstance(exc, PellucidError) or "\n" in str(exc):
                    raise
    return one, "run"


FAMILIES = {"coco": coco_family, "csv boxes": csv_family, "safetensors": safetensors_family,
            "onnx": onnx_family, "run folders": run_folder_family}


def campaign(n: int, seed: int = 0, families: list[str] | None = None) -> dict[str, dict]:
    """Per family: files tried, read, refused cleanly, and the unclean ones (with the error)."""
    import warnings

    from pellucid.errors import PellucidError
    from pellucid.progress import quiet

    warnings.simplefilter("ignore")
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pellucid-fuzz-") as tmp, quiet():
        for name in families or list(FAMILIES):
            root = Path(tmp) / name.replace(" ", "_")
            root.mkdir()
            one, filename = FAMILIES[name](root)
            rng = random.Random(f"{seed}:{name}")
            counts = {"tried": 0, "read": 0, "refused": 0, "unclean": []}
            for i in range(n):
                path = root / f"{i}-{filename}"
                counts["tried"] += 1
                try:
                    one(rng, path)
                    counts["read"] += 1
                except PellucidError as exc:
                    if "\n" in str(exc):
                        counts["unclean"].append(f"{i}: multi-line message {str(exc)[:200]!r}")
                    else:
                        counts["refused"] += 1
                except Exception as exc:
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    counts["unclean"].append(f"{i}: {type(exc).__name__}: {str(exc)[:160]} "
                                             f"({Path(where.filename).name}:{where.lineno})")
            out[name] = counts
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="mutants per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--family", action="append", choices=list(FAMILIES))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    results = campaign(args.n, args.seed, args.family)
    if args.json:
        print(json.dumps(results))
        return
    print(f"{'family':<14}{'tried':>7}{'read':>7}{'refused':>9}{'unclean':>9}")
    for name, c in results.items():
        print(f"{name:<14}{c['tried']:>7}{c['read']:>7}{c['refused']:>9}{len(c['unclean']):>9}")
        for line in c["unclean"][:10]:
            print(f"    {line}")
    total = sum(c["tried"] for c in results.values())
    bad = sum(len(c["unclean"]) for c in results.values())
    print(f"{total} files tried, {bad} unclean")


if __name__ == "__main__":
    main()
