"""No answer beyond what the model knows: the description of a model's training inputs (a
Mahalanobis distance of pooled features, probabilistic PCA) checked by hand and on held-out data;
a phantom-trained model refuses the shared real radiographs and, overridden, states no finding;
phantom classes carry no clinical codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pellucid.models.training_inputs import TrainingInputs, _fit, fit


def test_the_distance_is_the_mahalanobis_distance_of_the_ppca_covariance():
    """D^2 = (f - mu)^T C^-1 (f - mu) with C = U diag(lambda) U^T + sigma^2 (I - U U^T)."""
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(80, 12)) * np.linspace(3, 0.5, 12)).float()
    mean, components, variances, residual = _fit(features)
    stats = TrainingInputs(mean, components, variances, residual, "layer", 1.0)
    u = components.double().numpy()
    cov = u.T @ np.diag(variances.double().numpy()) @ u + residual * (np.eye(12) - u.T @ u)
    probe = torch.from_numpy(rng.normal(size=(5, 12)) * 2).float()
    centred = probe.double().numpy() - mean.double().numpy()
    by_hand = np.sqrt(np.einsum("ni,ij,nj->n", centred, np.linalg.inv(cov), centred))
    np.testing.assert_allclose(stats.distance(probe).numpy(), by_hand, rtol=1e-8)
    assert len(variances) == min(16, 80 // 4, 11)


def test_false_alarms_near_the_stated_rate_and_shifted_inputs_flagged():
    """Out-of-fold calibration: on fresh draws from the same distribution about 1 % are flagged
    (at most 4 % of 2,000, a generous binomial bound); inputs shifted by three standard
    deviations along every axis are flagged."""
    rng = np.random.default_rng(1)
    scale = np.linspace(2, 0.2, 24)
    stats = fit(torch.from_numpy(rng.normal(size=(400, 24)) * scale).float(), "layer", 0.01)
    fresh = torch.from_numpy(rng.normal(size=(2000, 24)) * scale).float()
    rate = float((stats.distance(fresh) > stats.threshold).double().mean())
    assert rate <= 0.04, rate
    shifted = fresh + torch.from_numpy(3 * scale).float()  # 3 standard deviations each way
    assert float((stats.distance(shifted) > stats.threshold).double().mean()) >= 0.99
    with pytest.raises(ValueError, match="at least 10"):
        fit(fresh[:9], "layer")


def test_the_chest_model_describes_its_inputs_and_has_no_clinical_codes(chest_model):
    card = chest_model.card
    assert card.training_data == "synthetic" and card.synthetic and card.finding_codes == {}
    entry = card.training_inputs
    assert entry["layer"] == "layer4" and entry["false_alarm"] == 0.01
    assert entry["held_out"]["n"] == 160 and entry["held_out"]["false_alarm"] <= 0.05, entry
    assert hasattr(chest_model.module, "pellucid_training_inputs")


def test_the_phantom_model_flags_the_shared_real_radiographs(chest_model, shared_data):
    from pellucid.data.inputs import load_input
    from pellucid.models.training_inputs import check_input

    card = chest_model.card
    pngs = sorted((shared_data / "chestxray14-sample" / "images").glob("*.png"))[::20]
    dicoms = [next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))]
    flagged = []
    for path in pngs + dicoms:
        x = load_input(path, 1, card.input_size, 2, card.resize).image[None]
        flagged.append(check_input(chest_model.module, card, card.normalize(x)).unlike)
    assert np.mean(flagged) >= 0.9, flagged  # measured: 198 of 200 radiographs
    assert flagged[-1]  # the SIIM radiograph


def test_a_real_radiograph_is_refused_and_overridden_states_no_finding(chest_model, shared_data,
                                                                        tmp_path, capsys):
    from PIL import Image

    from pellucid.cli import main
    from pellucid.data import ChestPhantom

    real = sorted((shared_data / "chestxray14-sample" / "images").glob("*.png"))[0]
    model = ["explain", "--model", chest_model.source, "--method", "gradcam"]
    with pytest.raises(SystemExit) as exc:
        main([*model, "--input", str(real), "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "unlike the synthetic images the model was trained on" in err
    assert "--outside-intended-use" in err
    main([*model, "--input", str(real), "--out", str(tmp_path / "over"), "--outside-intended-use"])
    record = json.loads((tmp_path / "over" / "summary.json").read_text())
    case = record[0]
    assert case["findings"] == [] and case["training_data"]["unlike_training_data"]
    assert case["summary"].startswith("INPUT UNLIKE THE TRAINING DATA")
    assert case["intended_use"]["override"]
    assert any("unlike the synthetic images" in o for o in case["intended_use"]["outside"])
    # a phantom like the training images is answered, with findings and no clinical codes
    image = ChestPhantom(1, 128, seed=5)[0]["image"][0].numpy()
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "phantom.png")
    main([*model, "--input", str(tmp_path / "phantom.png"), "--out", str(tmp_path / "phantom")])
    record = json.loads((tmp_path / "phantom" / "summary.json").read_text())
    case = record[0]
    assert not case["training_data"]["unlike_training_data"]
    assert case["training_data"]["distance"] <= case["training_data"]["threshold"]
    assert len(case["findings"]) == 3 and all(f["code"] is None for f in case["findings"])


def test_the_description_travels_with_the_model_and_a_changed_file_is_refused(chest_model,
                                                                               tmp_path):
    import shutil

    from pellucid.errors import ModelError
    from pellucid.models import load_model

    folder = tmp_path / "chest"
    shutil.copytree(chest_model.source, folder)
    again = load_model(folder).module.pellucid_training_inputs
    assert torch.equal(again.mean, chest_model.module.pellucid_training_inputs.mean)
    stored = folder / "training_inputs.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="differs from the SHA-256"):
        load_model(folder)
    stored.unlink()
    with pytest.raises(ModelError, match="is missing"):
        load_model(folder)


def test_a_run_model_trained_before_descriptions_is_described_when_reused(tmp_path):
    """A benchmark reuses the models it trained; one whose card predates training_inputs is
    described on its own validation and test splits, and marked as the reader says."""
    from pellucid.bench.config import parse_config
    from pellucid.bench.runner import prepare_model

    config = parse_config({
        "name": "old", "seed": 0,
        "datasets": {"chest": {"reader": "phantom-chest", "cases": 2, "options": {"size": 32}}},
        "models": {"r18": {"datasets": ["chest"], "train": {
            "reader": "phantom-chest", "options": {"size": 32}, "n_train": 32, "n_val": 16,
            "arch": "resnet18", "epochs": 1, "batch_size": 16}}},
        "methods": ["gradcam"], "metrics": ["pointing_game"]})
    spec = config.models["r18"]
    _, folder = prepare_model(spec, tmp_path, 0)
    card = json.loads((folder / "card.json").read_text())
    assert card["training_inputs"]["held_out"]["n"] == 16
    card.update(training_inputs={}, training_data="")  # as a card written before both existed
    (folder / "card.json").write_text(json.dumps(card))
    (folder / "training_inputs.safetensors").unlink()
    loaded, _ = prepare_model(spec, tmp_path, 0)
    assert loaded.card.training_data == "synthetic" and loaded.card.finding_codes == {}
    assert loaded.card.training_inputs["fitted_on"] == "validation images (n=16)"
    assert hasattr(loaded.module, "pellucid_training_inputs")


def test_the_python_api_refuses_a_real_radiograph_for_a_phantom_model(chest_model, shared_data):
    """``pellucid.explain`` with a LoadedModel checks each input against the training inputs:
    asked to refuse, a phantom model refuses the SIIM radiograph in one line naming the input; by
    default it explains it with a warning naming the input and records the check; phantoms pass
    without a warning."""
    import warnings

    import pellucid
    from pellucid.data import ChestPhantom
    from pellucid.data.inputs import load_input
    from pellucid.errors import ModelError

    card = chest_model.card
    real = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    x_real = card.normalize(load_input(real, 1, card.input_size, 2, card.resize).image[None])
    phantoms = ChestPhantom(2, card.input_size[0], seed=11)
    x_phantom = card.normalize(torch.stack([phantoms[k]["image"] for k in range(2)]))
    with pytest.raises(ModelError) as refused:
        pellucid.explain(chest_model, torch.cat([x_phantom, x_real]), "gradcam",
                         unlike_training_data="refuse")
    message = str(refused.value)
    assert message.startswith("input 2: unlike the synthetic images") and "\n" not in message
    with pytest.warns(UserWarning, match="input 0: unlike the synthetic images"):
        exp = pellucid.explain(chest_model, x_real, "gradcam")
    assert exp.extras["training_data"][0]["unlike_training_data"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pellucid.explain(chest_model, x_real, "gradcam", unlike_training_data="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # phantoms like the training data: no warning
        exp = pellucid.explain(chest_model, x_phantom, "gradcam")
    assert [c["unlike_training_data"] for c in exp.extras["training_data"]] == [False, False]
    bare = pellucid.explain(chest_model.module, x_real, "gradcam", layer=card.default_layer)
    assert "training_data" not in bare.extras  # a bare module: no card, nothing to check against
