"""The oracle tests' record of their differences from the peers (tests/peers.py), by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.peers import peer, record


def test_relative_difference_correlation_and_the_written_lines(tmp_path, monkeypatch):
    path = tmp_path / "peers.jsonl"
    monkeypatch.setenv("PELLUCID_RECORD_PEERS", str(path))
    diff = record("gradcam", "p", torch.tensor([1.0, 2.0, 4.1]), np.array([1.0, 2.0, 4.0]), "c")
    assert diff == pytest.approx(0.1 / 4.0)
    both_nan = record("pointing_game", "p", [np.nan, 1.0], [np.nan, 1.0], "c")
    assert both_nan == 0.0
    r = record("smoothgrad", "p", [1.0, 2.0, 3.0], [2.0, 4.0, 6.5], "c", "correlation")
    assert r == pytest.approx(float(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1]))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["name"], x["measure"]) for x in lines] == [
        ("gradcam", "difference"), ("pointing_game", "difference"), ("smoothgrad", "correlation")]
    with pytest.raises(ValueError, match="shapes"):
        record("gradcam", "p", [1.0, 2.0, 3.0], [1.0, 2.0], "c")
    monkeypatch.delenv("PELLUCID_RECORD_PEERS")
    record("gradcam", "p", [1.0], [1.0], "c")
    assert len(path.read_text().splitlines()) == 3  # nothing written without the variable
    assert peer("grad-cam", "GradCAM").startswith("pytorch-grad-cam 1.5.")
