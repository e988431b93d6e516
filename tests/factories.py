"""Model factories used by the ``module:factory`` loading tests."""

from pellucid.models import build


def tiny_resnet():
    return build("resnet18", 2, 1, 2).module


def tiny_bench(folder, name: str, methods: list, metrics: list, cases: int, size: int,
               n_train: int) -> dict:
    """A ResNet-18 trained for one epoch on ``n_train`` chest phantoms of ``size`` px, saved under
    ``folder/chest``, and the configuration of a benchmark of ``methods`` x ``metrics`` on
    ``cases`` phantom cases (a dict, as a user's YAML would read)."""
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, save_model, train

    result = train(open_dataset("phantom-chest", split="train", n=n_train, size=size),
                   TrainConfig(epochs=1, batch_size=min(32, n_train // 2), progress=False))
    model = save_model(folder / "chest", result.module, result.card)
    return {"name": name, "seed": 0, "batch_size": 2, "gallery": 2,
            "datasets": {"chest": {"reader": "phantom-chest", "cases": cases,
                                   "options": {"size": size}}},
            "models": {"r18": {"datasets": ["chest"], "path": str(model)}},
            "methods": methods, "metrics": metrics}


def hf_vit():
    """A small Hugging Face ViT classifier (returns an ImageClassifierOutput)."""
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=64, patch_size=16, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_labels=2, initializer_range=0.2))


def nnunet_2d():
    """An nnU-Net v2 2D U-Net with deep supervision (returns a list, full resolution first)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    return PlainConvUNet(1, 3, (8, 16, 32), nn.Conv2d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), False,
                         nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)


def xrv_densenet():
    """TorchXRayVision's DenseNet-121 (18 chest findings), built without its downloadable weights."""
    import torchxrayvision as xrv

    return xrv.models.DenseNet(weights=None)


def phantom_dicom(template, out, seed: int = 0, size: int = 128):
    """A copy of the DICOM file ``template`` (its patient, study and equipment header, as a
    hospital's file has them) whose pixels are a chest phantom, with new series and instance
    UIDs: a file laid out like the real one whose image is like the phantom models' training data
    (a phantom model refuses the real image itself). 12-bit MONOCHROME2, uncompressed."""
    import numpy as np
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pellucid.data import ChestPhantom

    ds = pydicom.dcmread(template)
    # a phantom whose intensities already span [0, 1]: a DICOM reader scales stored values to
    # that range, and a contrast-stretched phantom is itself unlike the training phantoms
    image = next(im for k in range(seed, seed + 200)
                 if float((im := ChestPhantom(1, size, seed=k)[0]["image"][0].numpy()).max()) >= 0.98)
    pixels = (np.clip(image, 0, 1) * 4095).round().astype(np.uint16)
    for keyword in ("NumberOfFrames", "ModalityLUTSequence", "VOILUTSequence", "RescaleSlope",
                    "RescaleIntercept", "PixelPaddingValue", "SmallestImagePixelValue",
                    "LargestImagePixelValue", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out
