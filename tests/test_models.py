"""Zoo networks, model cards, and loading a model three ways."""

from __future__ import annotations

import json

import pytest
import torch

from pellucid.errors import DataError, ModelError
from pellucid.models import ModelCard, build, load_model, save_model
from pellucid.models.zoo import count_parameters


@pytest.mark.parametrize("arch,dims,channels,size", [
    ("resnet18", 2, 1, 64), ("resnet18", 3, 4, 32), ("resnet50", 2, 3, 64),
    ("densenet121", 2, 2, 64), ("densenet121", 3, 1, 32), ("unet", 2, 4, 32), ("unet", 3, 4, 16),
])
def test_zoo_networks_take_their_inputs(arch, dims, channels, size):
    built = build(arch, dims, channels, 3)
    x = torch.zeros(2, channels, *(size,) * dims)
    with torch.no_grad():
        y = built.module.eval()(x)
    if arch == "unet":
        assert y.shape == (2, 3, *(size,) * dims)
    else:
        assert y.shape == (2, 3)
    assert built.module.get_submodule(built.default_layer) is not None
    assert count_parameters(built.module) > 1000


def test_torchvision_and_monai_resnet_backends():
    assert type(build("resnet18", 2, 3, 2).module).__module__.startswith("torchvision")
    monai = build("resnet18", 2, 3, 2, backend="monai").module
    assert type(monai).__module__.startswith("monai")
    assert monai.conv1.stride == (2, 2)  # conv1_t_stride=2, the usual layout


def _card(**overrides) -> ModelCard:
    data = dict(arch="resnet18", task="classification", class_names=["a", "b"], in_channels=1,
                spatial_dims=2, input_size=[32, 32], backend="torchvision", default_layer="layer4",
                normalization={"kind": "meanstd", "mean": [0.5], "std": [0.25]})
    data.update(overrides)
    return ModelCard(**data)


def test_zoo_folder_round_trip(tmp_path):
    card = _card()
    module = build("resnet18", 2, 1, 2).module.eval()
    save_model(tmp_path / "m", module, card)
    loaded = load_model(tmp_path / "m")
    assert loaded.card == card
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), module(x))
    assert torch.allclose(card.normalize(torch.full((1, 1, 2, 2), 0.75)), torch.ones(1, 1, 2, 2))


def test_torchscript_and_factory_loading(tmp_path):
    module = build("resnet18", 2, 1, 2).module.eval()
    x = torch.randn(1, 1, 32, 32)
    scripted = torch.jit.trace(module, x)
    scripted.save(str(tmp_path / "model.pt"))
    with torch.no_grad():
        ref = module(x)
        assert torch.allclose(load_model(tmp_path / "model.pt").module(x), ref, atol=1e-6)
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    factory = load_model("tests.factories:tiny_resnet", weights=tmp_path / "weights.pt")
    with torch.no_grad():
        assert torch.allclose(factory.module(x), ref)


def test_bad_model_specs_give_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such model"):
        load_model(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "card.json").write_text("{not json")
    with pytest.raises(DataError, match=r"card\.json: model card is not valid JSON"):
        load_model(tmp_path / "bad")
    (tmp_path / "bad" / "card.json").write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(DataError, match="lacks key"):
        load_model(tmp_path / "bad")
    with pytest.raises(ModelError, match="cannot import"):
        load_model("tests.factories:nothing_here")
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a TorchScript file"):
        load_model(tmp_path / "x.pt")
    module = build("resnet18", 2, 1, 2).module
    save_model(tmp_path / "m", module, _card(class_names=["a", "b", "c"]))
    with pytest.raises(ModelError, match="weights do not fit"):
        load_model(tmp_path / "m")
