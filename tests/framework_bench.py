"""``pellucid bench`` of a model that reads its own input (an nnU-Net results folder, a MONAI
bundle) on a dataset laid out as a user's: a CSV listing NIfTI volumes and their label files."""

from __future__ import annotations

from tests.nnunet_results import _write, sphere_case


def _spheres_csv(folder, cases: int = 3) -> str:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = ["path,label,mask"]
    for k in range(cases):
        image, label, _ = sphere_case(200 + k)
        _write(image, folder / "data" / f"c{k}_0000.nii.gz")
        _write(label, folder / "data" / f"c{k}_seg.nii.gz")
        rows.append(f"data/c{k}_0000.nii.gz,lesion,data/c{k}_seg.nii.gz")
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "cases.csv")


def framework_bench(model: str, folder, methods: list[str], metrics: list[str]):
    """``pellucid bench`` of a framework model on three sphere volumes listed in a CSV (the files
    read by the framework, the label files taken onto its grid), to the report."""
    from pellucid.bench import parse_config, run_bench

    cfg = {"name": "framework", "seed": 0, "batch_size": 2, "baselines": False,
           "datasets": {"spheres": {"reader": "csv", "root": _spheres_csv(folder), "split": "all",
                                    "cases": 3, "options": {"class_names": ["lesion"],
                                                            "mask_format": "label"}}},
           "models": {"m": {"datasets": ["spheres"], "path": model}},
           "methods": methods, "metrics": metrics}
    frame = run_bench(parse_config(cfg), folder / "run", progress=False, report=True)
    assert (folder / "run" / "report.html").is_file()
    return frame
