"""Hostile and careless inputs to the readers, the command line and a benchmark run folder:
decompression bombs refused from the header, non-finite pixels refused in every format, pickles
planted wherever pellucid reads a run folder never executed, corrupt result parts moved aside and
re-run, and property-based fuzzing of the readers and the configuration parser. Every case ends in
a clean refusal (one ``error:`` line, exit status 2) or a correct result."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pellucid.cli import main
from pellucid.data.inputs import load_input
from pellucid.errors import ConfigError, DataError, PellucidError
from pellucid.guards import SERVICE_LIMITS, TooLarge, decode_limits
from tests import hostile

VALUE_COLUMNS = ["dataset", "model", "case_id", "target", "method", "metric", "value", "reason"]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the command line in-process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    """The one ``error:`` line of stderr (``warning:`` lines about repaired state may precede it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), err
    return errors[0]


# ---------------------------------------------------------------- readers

@pytest.mark.parametrize("case", list(hostile.corpus(Path("/nonexistent"))))
def test_decompression_bombs_and_non_finite_pixels_are_refused_by_every_reader(case, tmp_path):
    name, data, expect = hostile.corpus(tmp_path)[case]
    path = tmp_path / name
    path.write_bytes(data)
    tracemalloc.start()
    try:
        volume = name.endswith((".nii", ".nii.gz"))  # read for a 3D model (a 2D one refuses it)
        with decode_limits(SERVICE_LIMITS), pytest.raises(DataError) as info:
            load_input(path, 1, [16, 16, 16] if volume else [64, 64], 3 if volume else 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    if expect == "too large":
        assert isinstance(info.value, TooLarge)
        assert any(k in message for k in ("(max_pixels)", "(max_voxels)", "(max_frames)"))
        assert peak < 200 * 2**20, f"{case}: {peak / 2**20:.0f} MiB allocated before refusing"
    elif expect == "non-finite":
        assert "non-finite values" in message
    assert not (tmp_path / "npy-marker").exists()


def test_the_default_limits_admit_real_images_and_the_service_limits_are_tighter(tmp_path):
    from pellucid.guards import DEFAULT_LIMITS

    path = tmp_path / "big.png"
    path.write_bytes(hostile.png_declaring(6000, 6000))  # 36 M pixels: over the service's 33.5 M
    with decode_limits(SERVICE_LIMITS), pytest.raises(TooLarge, match=r"33,554,432 pixels"):
        load_input(path, 1, [64, 64], 2)
    assert SERVICE_LIMITS.max_pixels < DEFAULT_LIMITS.max_pixels
    with pytest.raises(DataError) as info:  # under the default limits it is decoded (and is broken)
        load_input(path, 1, [64, 64], 2)
    assert not isinstance(info.value, TooLarge)


def test_explain_api_refuses_non_finite_inputs_and_outputs():
    import pellucid

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    x = torch.ones(1, 1, 16, 16)
    x[0, 0, 3, 3] = float("nan")
    with pytest.raises(ConfigError, match="1 non-finite values"):
        pellucid.explain(model, x, "saliency")
    huge = torch.full((1, 1, 16, 16), 3e38)  # finite pixels, an overflowing model output
    model[0].weight.data.fill_(10.0)
    with pytest.raises(PellucidError, match="output on these inputs is not finite"):
        pellucid.explain(model, huge, "saliency")


# ---------------------------------------------------------------- command line

def test_cli_refuses_non_finite_and_bad_files_with_one_error_line(chest_model, tmp_path, capsys):
    corpus = hostile.corpus(tmp_path)
    for case in ("float tiff with NaN", "float tiff with Inf", "npy with NaN", "npy with Inf",
                 "npy of objects", "png header 60000^2", "dicom truncated"):
        name, data, expect = corpus[case]
        path = tmp_path / name
        path.write_bytes(data)
        code, err = _cli(capsys, "explain", "--model", chest_model.source, "--input", str(path),
                         "--out", str(tmp_path / "out"))
        line = _one_error_line(err)
        assert code == 2, (case, err)
        if expect == "non-finite":
            assert "non-finite values" in line
    assert not (tmp_path / "npy-marker").exists()
    (tmp_path / "a_file").write_text("x")
    good = tmp_path / "good.png"
    good.write_bytes(hostile.noise_png(128))
    code, err = _cli(capsys, "explain", "--model", chest_model.source, "--input", str(good),
                     "--out", str(tmp_path / "a_file"))
    assert code == 2 and "exists and is not a folder" in _one_error_line(err)
    code, err = _cli(capsys, "review", "serve", "--db", str(tmp_path / "missing" / "review.db"))
    assert code == 2 and "does not exist" in _one_error_line(err)
    code, err = _cli(capsys, "serve", "--models", str(tmp_path / "none"))
    assert code == 2 and "no such models folder" in _one_error_line(err)
    assert "warning" not in err
    code, err = _cli(capsys, "serve", "--models", str(tmp_path / "none"), "--api-key", "k")
    assert code == 2 and "no such models folder" in _one_error_line(err)
    assert "warning: --api-key is visible" in err and "PELLUCID_API_KEY" in err


def test_weights_with_python_objects_are_refused_in_one_line_and_never_run(tmp_path, capsys):
    marker = tmp_path / "weights-marker"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(hostile.torch_pickle_bytes(marker))
    code, err = _cli(capsys, "layers", "torchvision.models:resnet18", "--weights", str(evil))
    line = _one_error_line(err)
    assert code == 2 and "refused: the file holds Python objects other than tensors" in line
    assert not marker.exists()


# ---------------------------------------------------------------- benchmark run folders

@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished tiny benchmark run (ResNet-18, one epoch on 64 px phantoms), with its config."""
    from pellucid.bench import parse_config, run_bench
    from tests.factories import tiny_bench

    root = tmp_path_factory.mktemp("hostile_run")
    raw = tiny_bench(root, "hostile", ["gradcam", "integratedgradients"],
                     ["sparseness", {"name": "deletion", "options": {"step": 256}}], cases=3, size=64,
                     n_train=64)
    config = parse_config(raw)
    table = run_bench(config, root / "run", progress=False)
    return root / "run", config, table


def _values(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[VALUE_COLUMNS].sort_values(VALUE_COLUMNS[:6]).reset_index(drop=True)


def test_pickles_planted_in_a_run_folder_never_execute(run_folder, tmp_path, capsys):
    """Every file pellucid reads from a run folder replaced by a pickle whose unpickling would
    write a marker file: the cached explanations, result parts and manifests, gallery and map
    archives; then the run is resumed and reported. Nothing executes, the table comes back equal."""
    from pellucid.bench import run_bench

    src, config, table = run_folder
    run = tmp_path / "run"
    shutil.copytree(src, run)
    marker = tmp_path / "marker"
    cached = sorted((run / "cache").glob("*.safetensors"))
    assert cached, "the run cached its explanations"
    for f in cached:
        f.write_bytes(hostile.torch_pickle_bytes(marker))
        f.with_suffix(".pt").write_bytes(hostile.torch_pickle_bytes(marker))  # the old name too
    for f in (run / "parts").glob("*.parquet"):
        f.write_bytes(hostile.pickle_bytes(marker))
    for f in (run / "parts").glob("*.json"):
        f.write_bytes(hostile.pickle_bytes(marker))
    for f in [run / "gallery.npz", *(run / "maps").glob("*.npz")]:
        f.write_bytes(hostile.object_npz_bytes(marker))
    (run / "run.json").write_bytes(hostile.pickle_bytes(marker))
    resumed = run_bench(config, run, progress=False)
    err = capsys.readouterr().err
    assert not marker.exists(), "a planted pickle was executed"
    assert "moved to bad/" in err and "not used" in err
    pd.testing.assert_frame_equal(_values(resumed), _values(table), atol=1e-6)
    assert len(list((run / "cache").glob("*.bad"))) == len(cached)
    code, err = _cli(capsys, "report", str(run))
    assert code == 0 and not marker.exists()
    # a model folder of the run (``models/<name>`` when the benchmark trained it)
    model = tmp_path / "models" / "r18"
    shutil.copytree(config.models["r18"].path, model)
    (model / "model.safetensors").write_bytes(hostile.torch_pickle_bytes(marker))
    code, err = _cli(capsys, "layers", str(model))
    assert code == 2 and "cannot read weights" in _one_error_line(err) and not marker.exists()


def test_a_corrupt_result_part_is_moved_aside_and_its_unit_re_run(run_folder, tmp_path, capsys):
    from pellucid.bench import run_bench

    src, config, table = run_folder
    run = tmp_path / "run"
    shutil.copytree(src, run)
    parts = sorted((run / "parts").glob("*.parquet"))
    parts[0].write_bytes(parts[0].read_bytes()[:100])  # truncated
    parts[1].write_bytes(b"")  # emptied
    code, err = _cli(capsys, "report", str(run))  # the report runs on what is left, says so
    assert code == 0 and err.count("is unusable") == 2 and "Traceback" not in err
    assert len(list((run / "parts" / "bad").glob("*.parquet"))) == 2
    resumed = run_bench(config, run, progress=False, report=False)
    pd.testing.assert_frame_equal(_values(resumed), _values(table), atol=1e-6)
    assert len(list((run / "parts").glob("*.parquet"))) == len(parts)


def _mutations(run: Path) -> dict:
    parts = sorted((run / "parts").glob("*.parquet"))

    def every_part(fn):
        return lambda: [fn(p) for p in parts]

    return {
        "no parts at all": every_part(lambda p: p.unlink()),
        "every part empty": every_part(lambda p: p.write_bytes(b"")),
        "every manifest gone": every_part(lambda p: p.with_suffix(".json").unlink()),
        "manifest not JSON": lambda: parts[0].with_suffix(".json").write_text("{nope"),
        "manifest a list": lambda: parts[0].with_suffix(".json").write_text("[1, 2]"),
        "manifest with other rows": lambda: parts[0].with_suffix(".json").write_text(json.dumps(
            json.loads(parts[0].with_suffix(".json").read_text()) | {"rows": 999})),
        "a part that is a folder": lambda: (run / "parts" / "x.parquet").mkdir(),
        "run.json garbage": lambda: (run / "run.json").write_text("\x00\xff garbage"),
        "run.json a list": lambda: (run / "run.json").write_text("[]"),
        "run.json odd values": lambda: (run / "run.json").write_text(json.dumps(
            {"gallery": "many", "tasks": {"r18|chest": 5}})),
        "performance.json odd": lambda: (run / "performance.json").write_text(
            json.dumps({"r18|chest": {"report": 7}})),
        "gallery.npz garbage": lambda: (run / "gallery.npz").write_bytes(b"PK\x03\x04garbage"),
        "gallery.npz without keys": lambda: np.savez(run / "gallery.npz", other=np.zeros(3)),
        "gallery.npz wrong shapes": lambda: np.savez(run / "gallery.npz", **{
            "r18|chest::images": np.zeros(3), "r18|chest::case_ids": np.array(["a"]),
            "r18|chest::targets": np.array(["b", "c"])}),
        "maps garbage": lambda: [f.write_bytes(b"junk") for f in (run / "maps").glob("*.npz")],
        "modality.json odd": lambda: (run / "modality.json").write_text(
            json.dumps({"r18|chest": {"channels": 3}})),
        "review summary odd": lambda: ((run / "review").mkdir(), (run / "review" / "summary.json")
                                       .write_text(json.dumps({"tables": 3}))),
    }


def test_no_run_folder_state_makes_report_crash(run_folder, tmp_path, capsys):
    src = run_folder[0]
    for name in _mutations(src):
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(src, run)
        _mutations(run)[name]()
        code, err = _cli(capsys, "report", str(run))
        assert code in (0, 2), (name, err)
        assert "Traceback" not in err, (name, err)
        if code == 2:
            assert "no verified result parts" in _one_error_line(err), name
        else:
            assert (run / "report.html").stat().st_size > 1000, name


# ---------------------------------------------------------------- property-based fuzzing

def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    img = rng.random((24, 24)).astype(np.float32)
    return {".png": hostile.noise_png(24), ".tif": hostile.float_tiff(img),
            ".nii.gz": hostile.nifti_bytes(rng.random((6, 6, 6)).astype(np.float32)),
            ".nii": hostile.nifti_bytes(rng.random((6, 6, 6)).astype(np.float32), gz=False),
            ".npy": hostile.npy_bytes(img[None]), ".dcm": hostile.dicom_bytes(16, 16)}


SEEDS = _seed_files()


@st.composite
def mutated(draw):
    suffix = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[suffix])
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif kind == "cut" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 64))]
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "header" and len(data) > 8:  # sizes and offsets live in the first bytes
            i = draw(st.integers(0, min(len(data), 400) - 4))
            data[i:i + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                                  b"\x7f\xff\xff\xff", b"\x00\x00\x01\x00"]))
    return suffix, bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_fuzzed_files_are_read_correctly_or_refused_cleanly(case, tmp_path):
    suffix, data = case
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    dims = 3 if suffix.startswith(".nii") else 2
    with decode_limits(SERVICE_LIMITS):
        try:
            item = load_input(path, 1, [16] * dims, dims)
        except PellucidError as exc:
            assert "\n" not in str(exc)
            return
    assert torch.isfinite(item.image).all() and torch.isfinite(item.original).all()


def _yaml_like(leaves):
    return st.recursive(leaves, lambda children: st.lists(children, max_size=4)
                        | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


LEAVES = st.none() | st.booleans() | st.integers(-3, 10**9) | st.floats(allow_nan=True) \
    | st.text(max_size=12) | st.sampled_from(["gradcam", "deletion", "phantom-chest", "chest", "r18"])


@st.composite
def configs(draw):
    base = {"name": "fuzz", "datasets": {"chest": {"reader": "phantom-chest", "cases": 2}},
            "models": {"r18": {"datasets": ["chest"], "path": "m"}}, "methods": ["gradcam"],
            "metrics": ["deletion"]}
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "datasets.chest", "models.r18", "methods", "metrics"]))
        key = draw(st.sampled_from(["name", "seed", "batch_size", "cache", "gallery", "reader",
                                    "cases", "options", "datasets", "path", "train", "targets",
                                    "region", "layer", "sliding_window", "reference", "threads",
                                    "skip_methods", "only_models", "x"]))
        value = draw(_yaml_like(LEAVES))
        if where == "top":
            base[key] = value
        elif where in ("methods", "metrics"):
            base[where] = draw(st.sampled_from([value, [value], [{"name": "gradcam", key: value}],
                                                [{"name": "deletion", "options": value}]]))
        else:
            section, name = where.split(".")
            if isinstance(base.get(section), dict) and isinstance(base[section].get(name), dict):
                base[section][name][key] = value
    return base


@settings(max_examples=300, deadline=None)
@given(raw=configs())
def test_fuzzed_configurations_parse_or_fail_with_a_config_error(raw):
    from pellucid.bench import parse_config

    try:
        parse_config(raw, "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml") and "\n" not in str(exc), str(exc)


def test_the_explanation_cache_round_trips_and_refuses_what_does_not_match(tmp_path):
    import pellucid
    from pellucid.bench.cache import CacheError, load_explanation, save_explanation
    from pellucid.targets import SegmentationTarget

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
    x = torch.rand(2, 1, 8, 8)
    exp = pellucid.explain(net, x, "integratedgradients", target=SegmentationTarget(1, "predicted"),
                           steps=4)
    path = tmp_path / "entry.safetensors"
    save_explanation(path, exp, "identity")
    back = load_explanation(path, "identity")
    assert torch.equal(back.attributions, exp.attributions) and torch.equal(back.raw, exp.raw)
    assert type(back.target) is type(exp.target)
    assert torch.equal(back.target.region, exp.target.region)
    assert back.extras.keys() == exp.extras.keys() and back.options["steps"] == 4
    with pytest.raises(CacheError, match="another unit"):
        load_explanation(path, "another identity")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="digest"):
        load_explanation(path, "identity")


def test_a_tiff_whose_page_chain_loops_is_refused_at_once(tmp_path):
    """Found by the fuzzer: a TIFF whose next-page offset points back at its own page made
    tifffile walk the chain for minutes and gigabytes before any size check. Only the first two
    page headers are read now."""
    import struct
    import time

    import tifffile

    from pellucid.io.files import read_raster

    tifffile.imwrite(tmp_path / "one.tif", np.random.default_rng(0).random((8, 8)).astype(np.float32))
    data = bytearray((tmp_path / "one.tif").read_bytes())
    ifd = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[ifd:ifd + 2])[0]
    nxt = ifd + 2 + 12 * entries
    data[nxt:nxt + 4] = struct.pack("<I", ifd)  # the next page is this page again
    (tmp_path / "loop.tif").write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(PellucidError, match="multi-page TIFF"):
        read_raster(tmp_path / "loop.tif")
    assert time.perf_counter() - start < 2
    assert read_raster(tmp_path / "one.tif").shape == (8, 8)


# ---------------------------------------------------------------- compressed DICOM codestreams

CODESTREAM_BOMBS = {
    "jpeg 2000 SIZ 40000^2 in a 64^2 header": lambda: hostile.jpeg2000_dicom(64, declare=40000),
    "jpeg SOF 60000^2 in a 64^2 header": lambda: hostile.jpeg_dicom(64, declare=60000),
    "rle segment expanding to 64 MB": lambda: hostile.rle_bomb(64, 64),
    "deflated dataset inflating to 2 GB": lambda: hostile.deflate_bomb(2048),
}


@pytest.mark.parametrize("case", list(CODESTREAM_BOMBS))
def test_codestream_bombs_are_refused_from_the_codestream_before_decoding(case, tmp_path):
    import time

    from pellucid.io import read

    path = tmp_path / "bomb.dcm"
    path.write_bytes(CODESTREAM_BOMBS[case]())
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with decode_limits(SERVICE_LIMITS), pytest.raises(DataError) as info:
            read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - start
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "refused before decoding" in message, message
    assert seconds < 5 and peak < 256 * 2**20, (case, seconds, peak / 2**20)


def test_valid_compressed_dicom_still_decodes_exactly(tmp_path):
    from pellucid.io import read

    for name, data, expected in [
        ("j2k.dcm", hostile.jpeg2000_dicom(64), (np.arange(64 * 64) % 4096).reshape(64, 64)),
        ("rle.dcm", hostile.rle_dicom(64), np.tile(np.arange(64), (64, 1))),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        image = read(path)
        assert np.array_equal(image.array[0].numpy(), expected.astype(np.float32)), name
    path = tmp_path / "jpeg.dcm"
    path.write_bytes(hostile.jpeg_dicom(64))
    assert tuple(read(path).array.shape) == (1, 64, 64)


def test_the_cli_refuses_a_jpeg2000_bomb_under_an_address_space_cap(chest_model, tmp_path):
    """The reported crash: under a 4 GiB address-space cap the CLI died with SIGSEGV decoding a
    6 KB file whose codestream declares 40000 x 40000. Now: one error line, exit 2, and under
    1 GiB above what importing torch and pellucid takes (about 0.85 GiB on its own)."""
    import resource
    import subprocess
    import sys

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(hostile.jpeg2000_dicom(64, declare=40000))

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    proc = subprocess.Popen([sys.executable, "-m", "pellucid.cli", "explain", "--model",
                             str(chest_model.source), "--input", str(bomb), "--out",
                             str(tmp_path / "out")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=cap)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 2, stderr[-2000:]
    line = _one_error_line(stderr)
    assert "JPEG 2000 codestream declares 40000 x 40000" in line
    floor = subprocess.Popen([sys.executable, "-c", "import torch, pellucid.pipeline"])
    _, _, floor_usage = os.wait4(floor.pid, 0)  # what importing torch and pellucid alone takes
    extra_mib = (usage.ru_maxrss - floor_usage.ru_maxrss) / 1024
    assert extra_mib < 1024, (usage.ru_maxrss / 1024, floor_usage.ru_maxrss / 1024)


def test_a_planar_rgb_tiff_is_three_channels_not_sixty_four(tmp_path):
    import tifffile

    from pellucid.io.files import read_image_2d

    rgb = (np.random.default_rng(0).random((3, 64, 48)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "contig.tif", np.moveaxis(rgb, 0, -1), photometric="rgb")
    for name in ("planar.tif", "contig.tif"):
        image = read_image_2d(tmp_path / name)
        assert image.shape == (3, 64, 48) and np.allclose(image, rgb / 255), name


def test_a_volume_for_a_2d_model_is_refused_from_the_nifti_header(tmp_path):
    """A 127 KB NIfTI of 131 M voxels (under the voxel limit) was decoded for 23 s and 3.2 GB before
    being refused as 3D for a 2D model; the header decides now."""
    import time

    path = tmp_path / "big.nii.gz"
    path.write_bytes(hostile.nifti_declaring((512, 512, 500)))
    start = time.perf_counter()
    with decode_limits(SERVICE_LIMITS), pytest.raises(DataError, match="cannot go to a 2D model"):
        load_input(path, 1, [64, 64], 2)
    assert time.perf_counter() - start < 2


# ---------------------------------------------------------------- boxes, COCO and CSV fields

def _coco_folder(tmp_path: Path, mutate) -> Path:
    """A one-image COCO set (64 x 48 PNG, one category, one box) with ``mutate(data)`` applied."""
    from PIL import Image

    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
            "categories": [{"id": 3, "name": "nodule"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [4, 5, 10, 12]}]}
    mutate(data)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    return path


COCO_CASES = {
    "category without id": (lambda d: d["categories"][0].pop("id"), "categories[0]: needs an integer 'id'"),
    "unknown category_id": (lambda d: d["annotations"][0].update(category_id=9),
                            "annotation 7: unknown category_id 9"),
    "3-value bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation 7: a box needs 4"),
    "negative width": (lambda d: d["annotations"][0].update(bbox=[4, 5, -10, 12]),
                       "annotation 7: the box has a non-positive width"),
    "NaN bbox": (lambda d: d["annotations"][0].update(bbox=[float("nan"), 5, 10, 12]),
                 "annotation 7: box values must be finite"),
    "Inf bbox": (lambda d: d["annotations"][0].update(bbox=[4, 5, float("inf"), 12]),
                 "annotation 7: box values must be finite"),
    "string bbox": (lambda d: d["annotations"][0].update(bbox=["4", 5, 10, 12]),
                    "annotation 7: bbox must be"),
    "image without file_name": (lambda d: d["images"][0].pop("file_name"), "images[0] (id 1): needs"),
    "string image_id": (lambda d: d["annotations"][0].update(image_id="1"),
                        "annotation 7: needs an integer 'image_id'"),
    "Inf category id": (lambda d: d["categories"][0].update(id=float("inf")), "categories[0]"),
    "odd polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]),
                    "annotation 7: a polygon"),
    "annotation not an object": (lambda d: d["annotations"].append(5), "annotation [1]"),
    "box far outside the image": (lambda d: d["annotations"][0].update(bbox=[500, 500, 10, 10]),
                                  "lies outside the 64 x 48 image"),
    "file name too long for the file system": (lambda d: d["images"][0].update(file_name="1" * 5000),
                                               "not found under"),
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_every_malformed_coco_field_is_one_line_naming_the_file_and_row(case, tmp_path):
    from pellucid.data.coco import COCODataset

    mutate, expected = COCO_CASES[case]
    path = _coco_folder(tmp_path, mutate)
    with pytest.raises(DataError) as info:
        COCODataset(path)[0]
    message = str(info.value)
    assert "\n" not in message and expected in message, message
    assert "coco.json" in message or "a.png" in message


def test_deeply_nested_json_and_a_partly_outside_box(tmp_path):
    from pellucid.data.coco import COCODataset

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match="nested too deeply"):
        COCODataset(deep)
    path = _coco_folder(tmp_path, lambda d: d["annotations"][0].update(bbox=[50, 40, 30, 30]))
    sample = COCODataset(path)[0]  # partly outside: clipped to the image, the stated rule
    assert sample["boxes"].tolist() == [[50.0, 40.0, 64.0, 48.0]]


CSV_BOXES = {
    "negative sides (xywh)": ("x,y,w,h", "4,5,-3,2", "xywh", "non-positive width or height"),
    "inverted (xyxy)": ("x0,y0,x1,y1", "20,5,4,9", "xyxy", "non-positive width or height"),
    "NaN": ("x0,y0,x1,y1", "nan,5,9,9", "xyxy", "must be finite"),
    "Inf": ("x0,y0,x1,y1", "1,5,inf,9", "xyxy", "must be finite"),
    "negative YOLO": ("cx,cy,bw,bh", "-0.2,0.5,0.1,0.1", "yolo", "fractions of the image"),
    "YOLO over 1": ("cx,cy,bw,bh", "0.5,0.5,1.5,0.1", "yolo", "fractions of the image"),
    "far outside": ("x0,y0,x1,y1", "900,900,950,950", "xyxy", "lies outside the 64 x 48 image"),
}


@pytest.mark.parametrize("case", list(CSV_BOXES))
def test_csv_boxes_that_cannot_exist_are_refused_naming_the_line(case, tmp_path):
    from PIL import Image

    from pellucid.data.folders import CSVDataset

    header, values, fmt, expected = CSV_BOXES[case]
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "a.png")
    cols = header.split(",")
    (tmp_path / "boxes.csv").write_text(f"path,label,{header}\na.png,nodule,{values}\n")
    with pytest.raises(DataError) as info:
        CSVDataset(tmp_path / "boxes.csv", columns={"box": cols}, box_format=fmt)[0]
    message = str(info.value)
    assert "\n" not in message and expected in message and "line 2" in message, message


@pytest.mark.models  # its ONNX family needs onnx (the 'models' extra)
def test_a_fuzzing_campaign_over_the_new_readers_ends_cleanly(tmp_path):
    """benchmarks/fuzz_readers.py (COCO, CSV boxes, safetensors, ONNX, run folders as evidence),
    40 mutants a family here in a child process (a crash of the process fails too); the full
    campaign is the script's default. Each mutant is read or refused in one line."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_readers.py"
    proc = subprocess.run([sys.executable, str(script), "--n", "40", "--json", "--seed", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"coco", "csv boxes", "safetensors", "onnx", "run folders"}
    for family, counts in results.items():
        assert counts["tried"] == 40 and not counts["unclean"], (family, counts["unclean"])
        assert counts["refused"] > 0, family  # the mutants do reach the checks
