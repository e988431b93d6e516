"""``pellucid import-model``: a user's torchvision ResNet-18 state dict, a module:factory with its
weights and a TorchScript file each become a model folder whose network gives exactly the
original's outputs; what cannot be read off the network is asked for in one line (above all the
activation of a multi-class head), and a mismatch is refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torchvision

from pellucid.cli import main
from pellucid.errors import DataError
from pellucid.models import load_model
from pellucid.version import __version__


def _refused(args: list[str], capsys, expected: str) -> None:
    """The command fails with status 2 and one ``error:`` line that says ``expected``."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]


def _torchvision_state(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    return net, tmp_path / "model.pt"


def test_a_torchvision_state_dict_becomes_a_folder_with_the_same_outputs(tmp_path):
    net, weights = _torchvision_state(tmp_path)
    main(["import-model", str(weights), "--out", str(tmp_path / "m"), "--arch", "resnet18",
          "--backend", "torchvision", "--task", "classification", "--classes", "glioma,meningioma,pituitary",
          "--activation", "softmax", "--input-size", "64,64", "--channels", "3",
          "--normalization", "imagenet", "--name", "brain-r18", "--version", "1.2"])
    loaded = load_model(tmp_path / "m")
    card = loaded.card
    assert (card.activation, card.class_names, card.in_channels, card.input_size) == \
        ("softmax", ["glioma", "meningioma", "pituitary"], 3, [64, 64])
    assert card.default_layer == "layer4" and card.normalization["kind"] == "meanstd"
    assert (card.name, card.version) == ("brain-r18", "1.2")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), net(x), rtol=0, atol=1e-6)


def test_the_activation_of_a_multi_class_head_is_asked_for_never_guessed(tmp_path, capsys):
    _, weights = _torchvision_state(tmp_path)
    args = ["import-model", str(weights), "--out", str(tmp_path / "m"), "--arch", "resnet18",
            "--backend", "torchvision", "--task", "classification", "--classes", "a,b,c",
            "--input-size", "64,64", "--channels", "3"]
    _refused(args, capsys, "3 outputs: give --activation softmax")
    _refused([*args[:-5], "a,b", "--activation", "softmax", "--input-size", "64,64", "--channels", "3"],
             capsys, "--classes names 2 outputs; the network gives 3")
    _refused(["import-model", str(weights), "--out", str(tmp_path / "m"), "--arch", "resnet18"],
             capsys, "--task: give one of")
    _refused(["import-model", str(weights), "--out", str(tmp_path / "m"), "--task", "classification",
              "--classes", "a,b,c", "--activation", "softmax", "--input-size", "64,64"], capsys,
             "give --arch")
    card = tmp_path / "card"
    card.mkdir()
    data = json.loads(json.dumps({"arch": "resnet18", "task": "classification", "class_names": ["a", "b"],
                                  "in_channels": 1, "spatial_dims": 2, "input_size": [64, 64]}))
    (card / "card.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="lacks 'activation'"):
        load_model(card)


def test_a_factory_and_a_torchscript_file_import_with_inferred_channels(tmp_path, capsys):
    from tests.factories import tiny_resnet

    torch.manual_seed(1)
    net = tiny_resnet().eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    main(["import-model", "tests.factories:tiny_resnet", "--weights", str(tmp_path / "w.pt"),
          "--out", str(tmp_path / "f"), "--task", "classification", "--classes", "no,yes",
          "--activation", "softmax", "--input-size", "64,64"])
    loaded = load_model(tmp_path / "f")
    assert loaded.card.factory == "tests.factories:tiny_resnet" and loaded.card.in_channels == 1
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), net(x), rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test's own scripting, not pellucid's
        scripted = torch.jit.script(net)
        scripted.save(str(tmp_path / "net.ts"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["import-model", str(tmp_path / "net.ts"), "--out", str(tmp_path / "t"), "--task",
              "classification", "--classes", "no,yes", "--activation", "sigmoid", "--input-size",
              "64,64"])
        ts = load_model(tmp_path / "t")
    # a model shipped as TorchScript imports and loads without torch's deprecation message, and
    # its card names the pellucid that wrote it
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    assert ts.card.pellucid_version == __version__ and loaded.card.pellucid_version == __version__
    assert ts.card.arch == "torchscript" and ts.card.activation == "sigmoid"
    with torch.no_grad():
        torch.testing.assert_close(ts.module(x), net(x), rtol=0, atol=1e-6)
    _refused(["import-model", "tests.factories:tiny_resnet", "--weights", str(tmp_path / "w.pt"),
              "--out", str(tmp_path / "g"), "--task", "classification", "--classes", "no,yes",
              "--activation", "softmax", "--input-size", "64,64", "--channels", "3"], capsys,
             "first convolution takes 1")


def test_a_card_resize_of_pil_uint8_reads_inputs_as_torchvision_did(tmp_path):
    """A model trained on torchvision's Resize of 8-bit PIL images: with --resize pil_uint8 the
    image pellucid gives it is exactly the one torchvision's pipeline makes (Resize, ToTensor)."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from pellucid.models import ModelCard, build, save_model
    from pellucid.pipeline import CaseOptions, read_case

    rng = np.random.default_rng(0)
    pixels = (rng.random((90, 120)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    torch.manual_seed(0)
    built = build("resnet18", 2, 1, 2)
    for method, tolerance in (("pil_uint8", 0.0), ("bilinear", 1e-5)):
        card = ModelCard(arch="resnet18", task="classification", class_names=["a", "b"], in_channels=1,
                         spatial_dims=2, input_size=[64, 64], activation="softmax",
                         backend=built.backend, resize=method)
        loaded = load_model(save_model(tmp_path / method, built.module, card))
        case = read_case(loaded, tmp_path / "x.png", CaseOptions(["saliency"]))
        if method == "pil_uint8":
            expected = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor()])(
                Image.open(tmp_path / "x.png"))
        else:
            grey = Image.fromarray(pixels.astype(np.float32) / 255, mode="F")
            expected = torch.from_numpy(np.array(grey.resize((64, 64), Image.BILINEAR)))[None]
        torch.testing.assert_close(case.item.image, expected.float(), atol=tolerance + 1e-7, rtol=0)


def test_safetensors_import_equals_the_pt_import(tmp_path):
    """The same ResNet-18 weights imported from .pt and from .safetensors (whose keys are sorted
    by name, so that the last key is not the output layer) give the same folder and outputs."""
    from safetensors.torch import save_file

    net, weights = _torchvision_state(tmp_path)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "model.safetensors")
    outputs = []
    for source, out in ((weights, "pt"), (tmp_path / "model.safetensors", "st")):
        main(["import-model", str(source), "--out", str(tmp_path / out), "--arch", "resnet18",
              "--backend", "torchvision", "--task", "classification", "--classes", "a,b,c",
              "--activation", "softmax", "--input-size", "64,64"])
        loaded = load_model(tmp_path / out)
        assert loaded.card.in_channels == 3
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            outputs.append(loaded.module(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_bad_weights_and_options_are_one_line(tmp_path, capsys):
    net, weights = _torchvision_state(tmp_path)
    state = net.state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    base = ["--arch", "resnet18", "--backend", "torchvision", "--task", "classification",
            "--classes", "a,b,c", "--activation", "softmax"]
    _refused(["import-model", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "n"), *base,
              "--input-size", "64,64"], capsys, "1 non-finite value(s) in layer2.0.conv1.weight")
    _refused(["import-model", str(weights), "--out", str(tmp_path / "h"), *base,
              "--input-size", "1000000,1000000"], capsys, "is over the limit")
    (tmp_path / "a_file").write_text("x")
    _refused(["import-model", str(weights), "--out", str(tmp_path / "a_file"), *base,
              "--input-size", "64,64"], capsys, "exists and is not a folder")
    _refused(["import-model", str(weights), "--out", str(tmp_path / "w"), *base[:-4],
              "--classes", "a,b", "--activation", "softmax", "--input-size", "64,64"], capsys,
             "the network gives 3 (its output layer fc.weight)")
    for factory, expected in (("os:system", "Python's standard library"),
                              ("builtins:print", "Python's standard library"),
                              ("pellucid.models.zoo:ARCHS", "not a function or class"),
                              ("torchvision.models:resnet18.__call__", "not a function or class"),
                              ("no such:thing", "a factory is package.module:function")):
        _refused(["import-model", factory, "--weights", str(weights), "--out",
                  str(tmp_path / "f"), "--task", "classification", "--classes", "a,b,c",
                  "--activation", "softmax", "--input-size", "64,64"], capsys, expected)
    assert not (tmp_path / "f").exists()
