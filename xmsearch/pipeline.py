"""The in-process reference path: frozen encoders + fusion, loaded once.

Used by training (feature caching), export (parity inputs), tests (what the server must
reproduce) and the baselines of the benchmarks.  Preprocessing is
:mod:`xmsearch.preprocess`, the same code the served python-backend models run.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xmsearch.models.fusion import AttentionFusion
from xmsearch.models.image import DEFAULT_IMAGE_MODEL, ImageEncoder
from xmsearch.models.text import DEFAULT_TEXT_MODEL, TextEncoder, resolve_text_model
from xmsearch.preprocess import SEQUENCE_BUCKET, ImagePreprocessor, TextPreprocessor, decode_text
from xmsearch.spec import Dims

logger = logging.getLogger(__name__)


@dataclass
class Encoders:
    """Frozen text and image encoders with their preprocessing."""

    text: TextEncoder
    image: ImageEncoder
    text_pre: TextPreprocessor
    image_pre: ImagePreprocessor
    text_model: str
    image_model: str
    image_session: object | None = None  # ONNX Runtime session, once use_onnx_images() was called

    @classmethod
    def load(cls, text_model: str = DEFAULT_TEXT_MODEL, image_model: str = DEFAULT_IMAGE_MODEL,
             image_checkpoint=None, max_length: int = 64) -> "Encoders":
        source = resolve_text_model(text_model, max_length=max_length)
        text = TextEncoder(source)
        image = ImageEncoder(image_model, image_checkpoint)
        return cls(text, image, TextPreprocessor(text.tokenizer_json(), source.preprocess),
                   ImagePreprocessor(image.preprocess), text_model, image_model)

    @property
    def dims(self) -> Dims:
        size = self.image.preprocess.size
        regions = (size // 32) ** 2  # both CNN families downsample by 32
        return Dims(text_dim=self.text.dim, image_dim=self.image.dim, regions=regions,
                    image_size=size, max_length=self.text_pre.config.max_length)

    @torch.no_grad()
    def text_states(self, texts: list[str], role: str, bucket: int = SEQUENCE_BUCKET
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, text_dim] token states and their [B, L] mask, L the longest text rounded
        up to ``bucket`` (as the served tokenizer pads)."""
        texts = [decode_text(t, what=f"text[{i}]") for i, t in enumerate(texts)]
        ids, mask = self.text_pre.encode(texts, role, bucket)
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        return self.text(ids_t, mask_t), mask_t

    @torch.no_grad()
    def image_regions(self, images: list[bytes]) -> torch.Tensor:
        px = np.stack([self.image_pre(b, what=f"image[{i}]") for i, b in enumerate(images)])
        if self.image_session is not None:
            sess = self.image_session
            return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: px})[0])
        return self.image(torch.from_numpy(px))

    def use_onnx_images(self, folder: Path, min_cosine: float = 0.9999) -> Path:
        """Run the image encoder through ONNX Runtime from now on.

        On CPU, ONNX Runtime encodes EfficientNet-Lite0 photos several times faster than
        PyTorch eager (depthwise convolutions; ``benchmarks/feature_encoding.py`` measured
        6x on 2 cores), which is most of what caching training features costs; it is also
        the runtime that serves the model.  The graph is exported once into ``folder``,
        named by a hash of the weights, and checked against PyTorch on sample photo-like
        images before it is used (a failed check raises ModelError).
        """
        from xmsearch.export import onnx as onnx_export
        from xmsearch.export.pipeline import sample_images
        from xmsearch.spec import IMAGE_ENCODER, member_specs

        spec = member_specs(self.dims)[IMAGE_ENCODER]
        # The input dtype is part of the name: a graph cached when pixels were float32 is not
        # fed uint8 ones.
        h = hashlib.sha256(f"{self.image_model}:{spec.inputs[0].dtype}".encode())
        for name, t in self.image.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().numpy().tobytes())
        path = Path(folder) / f"image-encoder-{self.image_model}-{h.hexdigest()[:16]}.onnx"
        px = torch.from_numpy(np.stack([self.image_pre(b) for b in sample_images(3)]))
        if not path.exists():
            logger.info("exporting the image encoder to %s for ONNX Runtime", path)
            tmp = path.with_name(path.name + ".tmp")
            onnx_export.export_onnx(self.image, spec, (px[:2],), tmp)
            tmp.replace(path)
        onnx_export.check_parity(self.image, spec, path, [(px,)], min_cosine)
        self.image_session = onnx_export.onnx_session(path)
        return path


class ReferencePipeline:
    """Encoders + fusion: what every served ensemble computes, in one process."""

    def __init__(self, encoders: Encoders, fusion: AttentionFusion):
        self.encoders = encoders
        self.fusion = fusion.eval()

    @torch.no_grad()
    def embed(self, texts: list[str] | None = None, images: list[bytes] | None = None,
              role: str = "query") -> np.ndarray:
        """Embed a batch: texts only, images only, or (text, image) pairs of equal length."""
        if texts is None and images is None:
            raise ValueError("give texts, images or both")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        if images is None:
            states, mask = self.encoders.text_states(texts, role)
            out = self.fusion.encode_text(states, mask)
        elif texts is None:
            out = self.fusion.encode_image(self.encoders.image_regions(images))
        else:
            states, mask = self.encoders.text_states(texts, role)
            regions = self.encoders.image_regions(images)
            out = (self.fusion.encode_joint(states, mask, regions, query=True) if role == "query"
                   else self.fusion.encode_item(states, mask, regions))
        return out.numpy().astype(np.float32)

    @torch.no_grad()
    def embed_items(self, texts: list[str], images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Catalogue items' two vectors, as the item ensemble returns them: ``EMBEDDING``
        (what every query searches) and ``PHOTO_EMBEDDING`` (photo queries' second ranking)."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        states, mask = self.encoders.text_states(texts, "passage")
        z, photo = self.fusion.encode_item_vectors(states, mask, self.encoders.image_regions(images))
        return z.numpy().astype(np.float32), photo.numpy().astype(np.float32)
