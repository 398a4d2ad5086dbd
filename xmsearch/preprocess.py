"""Preprocessing: the one implementation of text tokenisation and image decoding.

Imported by the python-backend models inside Triton *and* by the in-process reference
path (training, parity tests, baselines), so the served and the reference vectors can
only differ by the numerics of the engines, never by preprocessing.

Only light dependencies here (numpy, Pillow, tokenizers): this module is imported by
every tokenizer / image-preprocess stub process, and pulling in torch or transformers
would cost each stub seconds of start-up and hundreds of MB.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from xmsearch.errors import InputError

# Limits that separate "a product title or query" from abuse.  Over-long *token*
# sequences are truncated as every BERT pipeline does; over-long *byte strings* are
# refused so a 10 MB "query" never reaches the tokenizer.
MAX_TEXT_BYTES = 4096
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_SIDE = 10_000
MAX_IMAGE_PIXELS = 40_000_000
SEQUENCE_BUCKET = 16  # pad to a multiple of this so the dynamic batcher can merge requests


@dataclass(frozen=True)
class TextPreprocessConfig:
    """How a text model wants its input: written next to the tokenizer at export."""

    max_length: int = 64
    query_prefix: str = ""
    passage_prefix: str = ""
    lowercase: bool = False  # handled by the tokenizer.json normaliser; informative only

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TextPreprocessConfig":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """Resize/crop/normalise settings of an image encoder (its training recipe)."""

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) per channel, float32 [3]: ``v * scale + shift`` is
        ``(v / 255 - mean) / std`` for an 8-bit value ``v``, the normalisation that the
        image encoder applies to the uint8 pixels it is sent (``ImageEncoder``)."""
        std = np.asarray(self.std, dtype=np.float64)
        mean = np.asarray(self.mean, dtype=np.float64)
        return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)

    @classmethod
    def from_json(cls, text: str) -> "ImagePreprocessConfig":
        d = json.loads(text)
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


# --------------------------------------------------------------------------- text


def decode_text(raw: bytes | str, *, what: str = "TEXT") -> str:
    """Validate one raw text input and return it as ``str``.

    Raises InputError for non-UTF-8 bytes, empty/blank text and text over
    ``MAX_TEXT_BYTES``; the message names ``what`` so the caller can say which input.
    """
    if isinstance(raw, str):
        data = raw.encode("utf-8")
    elif isinstance(raw, (bytes, bytearray, np.bytes_)):
        data = bytes(raw)
    else:
        raise InputError(f"{what} must be UTF-8 bytes or str, got {type(raw).__name__}")
    if len(data) > MAX_TEXT_BYTES:
        raise InputError(
            f"{what} is {len(data)} bytes, over the limit of {MAX_TEXT_BYTES}: "
            "send a product title or a search query, not a document")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise InputError(f"{what} is empty: send at least one non-blank character")
    return text


class TextPreprocessor:
    """UTF-8 text -> (input_ids, attention_mask) with bucketed padding.

    Reads ``tokenizer.json``, the file transformers' AutoTokenizer wraps, without importing
    transformers.  A SentencePiece Unigram vocabulary (multilingual-e5, XLM-RoBERTa) is encoded
    by SentencePiece itself (``xmsearch.unigram``: about 80 MB per process instead of the
    ``tokenizers`` library's 270 MB, the same ids on ordinary text); any other tokenizer by the
    ``tokenizers`` library.
    """

    def __init__(self, tokenizer_json: Path, config: TextPreprocessConfig):
        from xmsearch.unigram import UnigramTokenizer

        self.config = config
        raw = Path(tokenizer_json).read_text(encoding="utf-8")
        self._unigram = UnigramTokenizer.from_tokenizer_json(json.loads(raw), config.max_length)
        if self._unigram is not None:
            self._tok = None
            self.pad_id = self._unigram.pad_id
            return
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(raw)
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=config.max_length)
        pad_id = self._tok.token_to_id("[PAD]")
        if pad_id is None:
            pad_id = self._tok.token_to_id("<pad>")
        self.pad_id = 0 if pad_id is None else pad_id

    @property
    def engine(self) -> str:
        """Which library encodes: "sentencepiece" or "tokenizers"."""
        return "tokenizers" if self._unigram is None else "sentencepiece"

    @classmethod
    def from_dir(cls, folder: Path) -> "TextPreprocessor":
        folder = Path(folder)
        cfg_path = folder / "text_preprocess.json"
        cfg = TextPreprocessConfig.from_json(cfg_path.read_text()) if cfg_path.exists() \
            else TextPreprocessConfig()
        return cls(folder / "tokenizer.json", cfg)

    def prefix(self, role: str) -> str:
        if role == "query":
            return self.config.query_prefix
        if role == "passage":
            return self.config.passage_prefix
        raise ValueError(f"role must be 'query' or 'passage', got {role!r}")

    def encode(self, texts: list[str], role: str, bucket: int = SEQUENCE_BUCKET
               ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise already-validated texts; pad to the longest, rounded up to ``bucket``."""
        prefix = self.prefix(role)
        batch = [prefix + t for t in texts]
        if self._unigram is not None:
            rows = self._unigram.encode_batch(batch)
        else:
            rows = [e.ids for e in self._tok.encode_batch(batch)]
        longest = max(len(r) for r in rows)
        width = min(self.config.max_length, -(-longest // bucket) * bucket)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            n = min(len(r), width)
            ids[i, :n] = r[:n]
            mask[i, :n] = 1
        return ids, mask


# -------------------------------------------------------------------------- image


def decode_image(data: bytes, *, what: str = "IMAGE") -> Image.Image:
    """Decode encoded JPEG/PNG/WebP bytes into an RGB image, refusing abuse early.

    The pixel-count check happens on the header, before any pixel is decoded, so a
    20000x20000 PNG costs a few bytes of parsing, not 1.2 GB of memory.
    """
    if not isinstance(data, (bytes, bytearray, np.bytes_)):
        raise InputError(f"{what} must be encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InputError(f"{what} is empty: send the bytes of a JPEG, PNG or WebP file")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"{what} is {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"{what} is {w}x{h} pixels, over the limit of {MAX_IMAGE_SIDE} per side "
                    f"and {MAX_IMAGE_PIXELS} pixels: downscale it before sending")
            if img.format == "JPEG":
                # Let libjpeg decode at a reduced scale: we only need ~224 px anyway.
                img.draft("RGB", (448, 448))
            img.load()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{what} is not a decodable image: no JPEG, PNG, WebP, GIF or BMP "
                         f"header in its {len(data)} bytes") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own bomb guard fires in open() for really huge headers.
        raise InputError(f"{what} is refused, too many pixels ({e}): downscale it before "
                         "sending") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} is a corrupt or truncated image ({e})") from None
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P"):
            # Product shots with transparency: composite on white, as shops display them.
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        img = img.convert("RGB")
    return img


class ImagePreprocessor:
    """RGB image -> uint8 pixels [3, size, size] (resize short side, centre crop).

    The pixels stay 8-bit: the image encoder's graph normalises them (``mean``, ``std`` of
    the config, ``ImageEncoder``), so the tensor that travels from this preprocessing step to
    the encoder, between Triton members or over the network, is a quarter of float32's
    bytes (benchmarks/results/NOTES.md, uint8 pixels).
    """

    def __init__(self, config: ImagePreprocessConfig):
        self.config = config

    @classmethod
    def from_dir(cls, folder: Path) -> "ImagePreprocessor":
        cfg_path = Path(folder) / "image_preprocess.json"
        cfg = ImagePreprocessConfig.from_json(cfg_path.read_text()) if cfg_path.exists() \
            else ImagePreprocessConfig()
        return cls(cfg)

    def cropped(self, img: Image.Image) -> Image.Image:
        """Resize the short side to ``size`` and crop the centre square."""
        size = self.config.size
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))

    def pixels(self, img: Image.Image) -> np.ndarray:
        img = self.cropped(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))  # [3, size, size] uint8

    def __call__(self, data: bytes, *, what: str = "IMAGE") -> np.ndarray:
        return self.pixels(decode_image(data, what=what))
