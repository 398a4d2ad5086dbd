"""Fusion checkpoints: trained weights plus the facts that make them usable.

A checkpoint records which encoders produced the features it was trained on (names
and dimensions) and a SHA-256 of its tensors.  Export refuses a checkpoint whose
encoders differ from the ones being exported (the fused space would be meaningless) and
one whose tensors no longer match their digest (tampered or damaged).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xmsearch.errors import CheckpointError
from xmsearch.models.fusion import AttentionFusion

FORMAT = "xmsearch-fusion/1"


@dataclass
class FusionCheckpoint:
    fusion: AttentionFusion
    text_model: str
    image_model: str
    trained: bool
    meta: dict = field(default_factory=dict)  # training summary: epochs, recall, catalogue

    def save(self, path: Path) -> None:
        """Write atomically (temp file + fsync + rename)."""
        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.fusion.state_dict().items()}
        payload = {
            "format": FORMAT,
            "fusion_config": self.fusion.config(),
            "text_model": self.text_model,
            "image_model": self.image_model,
            "trained": self.trained,
            "meta": self.meta,
            "state_dict": state,
            "sha256": state_digest(state),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary file
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path) -> "FusionCheckpoint":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"fusion checkpoint {path} does not exist: train one with "
                                  "`xmsearch train CATALOG --out CKPT`")
        try:
            payload = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged zip/pickle
            raise CheckpointError(f"fusion checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an xmsearch fusion checkpoint ({FORMAT})")
        state = payload["state_dict"]
        if state_digest(state) != payload.get("sha256"):
            raise CheckpointError(
                f"fusion checkpoint {path} fails its SHA-256 check: the weights were modified "
                "after training. Re-train or restore the file.")
        try:
            fusion = AttentionFusion(**payload["fusion_config"])
        except (TypeError, ValueError, KeyError) as e:  # settings of another xmsearch version
            raise CheckpointError(f"fusion checkpoint {path} has fusion settings this version of xmsearch "
                                  f"cannot build ({e}); train it again with this version") from e
        try:
            fusion.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"fusion checkpoint {path} does not fit its own config: {e}") from e
        fusion.eval()
        return cls(fusion, payload["text_model"], payload["image_model"], bool(payload["trained"]),
                   dict(payload.get("meta", {})))

    def check_encoders(self, text_model: str, text_dim: int, image_model: str, image_dim: int,
                       source: Path | str = "checkpoint") -> None:
        """Refuse a checkpoint trained on other encoders than the ones being exported."""
        cfg = self.fusion.config()
        problems = []
        if self.text_model != text_model:
            problems.append(f"text model {self.text_model!r} (export uses {text_model!r})")
        if self.image_model != image_model:
            problems.append(f"image model {self.image_model!r} (export uses {image_model!r})")
        if cfg["text_dim"] != text_dim or cfg["image_dim"] != image_dim:
            problems.append(f"dims text {cfg['text_dim']}/image {cfg['image_dim']} "
                            f"(encoders give {text_dim}/{image_dim})")
        if problems:
            raise CheckpointError(
                f"fusion {source} was trained on " + "; ".join(problems)
                + ". Train a checkpoint for these encoders or pass matching --text-model/--image-model.")


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        buf = io.BytesIO()
        buf.write(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        h.update(buf.getvalue())
    return h.hexdigest()
