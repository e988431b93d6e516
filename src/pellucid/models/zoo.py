"""Network builders: torchvision and MONAI classifiers and MONAI U-Nets, 2D and 3D, 1-4 channels.

=============  ==============================  ===============================  ===================
arch           2D                              3D                               default CAM layer
=============  ==============================  ===============================  ===================
resnet18/50    torchvision (``backend=monai``  MONAI ResNet, ``conv1_t_stride=2``  ``layer4``
               for MONAI's)
densenet121    MONAI DenseNet121               MONAI DenseNet121                ``class_layers.relu``
unet           MONAI UNet, residual units      MONAI UNet                       ``model.1.submodule.2``
vit            MONAI ViT (patch 16 or 8, 4     MONAI ViT                        ``blocks.3.norm1``
               blocks of 4 heads, width 96, a class
               token, a linear head)
=============  ==============================  ===============================  ===================

A ViT is built for one input size (``input_size``; patches of 16 px, or 8 below 224 px) and returns
(logits, hidden states), whose first element pellucid explains (``pellucid.models.outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pellucid.errors import ConfigError

ARCHS = ("resnet18", "resnet50", "densenet121", "unet", "vit")
CLASSIFIERS = ("resnet18", "resnet50", "densenet121", "vit")
VIT = {"hidden_size": 96, "mlp_dim": 192, "num_layers": 4, "num_heads": 4}
UNET_CHANNELS = (16, 32, 64, 128)


@dataclass(frozen=True)
class Built:
    module: nn.Module
    backend: str
    default_layer: str
    task: str


def _torchvision_resnet(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def build(arch: str, spatial_dims: int, in_channels: int, out_channels: int,
          backend: str | None = None, unet_channels: tuple[int, ...] = UNET_CHANNELS,
          input_size: tuple[int, ...] | list[int] | None = None) -> Built:
    """Build an untrained network; ``out_channels`` is classes (classifiers) or mask channels;
    ``input_size`` is needed by ``vit`` only."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; available: {', '.join(ARCHS)}")
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if not 1 <= in_channels <= 16:
        raise ConfigError(f"in_channels must be between 1 and 16, got {in_channels}")
    if out_channels < 1:
        raise ConfigError(f"the network needs at least one output, got {out_channels}")
    from monai.networks import nets

    if arch.startswith("resnet"):
        backend = backend or ("torchvision" if spatial_dims == 2 else "monai")
        if backend == "torchvision":
            if spatial_dims != 2:
                raise ConfigError("torchvision ResNets are 2D only; use backend='monai' for 3D")
            module = _torchvision_resnet(arch, in_channels, out_channels)
        elif backend == "monai":
            module = getattr(nets, arch)(spatial_dims=spatial_dims, n_input_channels=in_channels,
                                         num_classes=out_channels, conv1_t_stride=2)
        else:
            raise ConfigError(f"backend must be 'torchvision' or 'monai', got {backend!r}")
        return Built(module, backend, "layer4", "classification")
    if backend not in (None, "monai"):
        raise ConfigError(f"{arch} is built from MONAI only, got backend={backend!r}")
    if arch == "vit":
        if input_size is None or len(input_size) != spatial_dims:
            raise ConfigError(f"arch vit is built for one input size; give input_size "
                              f"({spatial_dims} values), got {input_size}")
        patch = 16 if min(input_size) >= 224 else 8
        if any(s % patch for s in input_size):
            raise ConfigError(f"arch vit: the input size {tuple(input_size)} must be a multiple of "
                              f"its patch size {patch}")
        module = nets.ViT(in_channels=in_channels, img_size=tuple(input_size), patch_size=patch,
                          spatial_dims=spatial_dims, classification=True, num_classes=out_channels,
                          post_activation=None, **VIT)
        return Built(module, "monai", f"blocks.{VIT['num_layers'] - 1}.norm1", "classification")
    if arch == "densenet121":
        module = nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels,
                                  out_channels=out_channels)
        return Built(module, "monai", "class_layers.relu", "classification")
    module = nets.UNet(spatial_dims=spatial_dims, in_channels=in_channels,
                       out_channels=out_channels, channels=tuple(unet_channels),
                       strides=(2,) * (len(unet_channels) - 1), num_res_units=2)
    return Built(module, "monai", "model.1.submodule.2", "segmentation")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
