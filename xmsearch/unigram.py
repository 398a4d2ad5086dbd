"""SentencePiece's engine for the Unigram tokenizers of XLM-RoBERTa and multilingual-e5.

The ``tokenizers`` library holds such a tokenizer's 250k pieces in a trie of hash maps:
about 270 MB in every process that loads the e5 ``tokenizer.json``, and a served repository
has five such processes (the text encoder's two instances and the three preprocessing stubs
that read text).  SentencePiece, the library these vocabularies were trained with, keeps the
same pieces in a double-array trie: a fresh process holds 78 MB more after loading them
against 282, and a lone query encodes in 4 us against 18, for 1.2 s of loading against 0.5
(``benchmarks/results/tokenizer_engines.md``).

:func:`sentencepiece_model` rebuilds the SentencePiece model from ``tokenizer.json`` (the
pieces with their scores, the precompiled normalisation map and the whitespace rules) when
the file has exactly the shape that conversion reproduces, and :class:`UnigramTokenizer`
encodes with it.  The ids are the ones ``tokenizers`` gives, with two rules of its own
reproduced here:

- text that ends in whitespace (after normalisation) ends with the lone piece ``"▁"``, where
  SentencePiece would drop it;
- truncation keeps the first ``max_length - 2`` pieces between ``<s>`` and ``</s>``.

One difference is kept on purpose: ``tokenizers`` turns the literal strings of special tokens
inside the text ("<s>", "</s>", "<pad>", "<unk>", "<mask>") into those control tokens, while
here they are text like any other (a shopper's query cannot inject a control token).
``tests/test_unigram.py`` holds both engines to the same ids on the demo catalogue, its
queries and random text, and to this one difference.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence

WHITESPACE_PIECE = "\u2581"  # "▁": SentencePiece's mark of a space
# SentencePiece's protobuf enums (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL = 1, 2, 3
_UNIGRAM = 1


# A minimal protobuf writer: the sentencepiece wheel's generated module needs a newer protobuf
# runtime than tritonclient allows, and the model has only a few field kinds.
def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError(f"negative varint {n}: not written here")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def _int(number: int, value: int) -> bytes:
    return _field(number, 0) + _varint(value)


def _float(number: int, value: float) -> bytes:
    return _field(number, 5) + struct.pack("<f", value)


def _normalizer_spec(charsmap: bytes, whitespace_rules: bool) -> bytes:
    """NormalizerSpec: name 1, precompiled_charsmap 2, add_dummy_prefix 3,
    remove_extra_whitespaces 4, escape_whitespaces 5."""
    flag = int(whitespace_rules)
    return _bytes(1, b"user_defined") + _bytes(2, charsmap) + _int(3, flag) + _int(4, flag) + _int(5, flag)


def _charsmap(tokenizer: dict) -> bytes | None:
    """The precompiled normalisation map, when the normalizer is what SentencePiece applies:
    the map alone, or the map and a collapse of repeated spaces (``remove_extra_whitespaces``)."""
    norm = tokenizer.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if not steps or steps[0].get("type") != "Precompiled":
        return None
    rest = steps[1:]
    collapse = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
    if rest not in ([], [collapse]):
        return None
    return base64.b64decode(steps[0]["precompiled_charsmap"])


def _metaspace(tokenizer: dict) -> bool:
    pre = tokenizer.get("pre_tokenizer") or {}
    prefix = pre.get("add_prefix_space", pre.get("prepend_scheme") == "always")
    return (pre.get("type") == "Metaspace" and pre.get("replacement") == WHITESPACE_PIECE
            and prefix is True and pre.get("split", True) is True)


def _frame(tokenizer: dict, vocab: dict[str, int]) -> tuple[int, int] | None:
    """(bos, eos) ids when the post-processor frames one text as ``<s> text </s>``."""
    post = tokenizer.get("post_processor") or {}
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    if not single or len(single) != 3 or "Sequence" not in single[1]:
        return None
    try:
        first, last = single[0]["SpecialToken"]["id"], single[2]["SpecialToken"]["id"]
    except (KeyError, TypeError):
        return None
    if first not in vocab or last not in vocab:
        return None
    return vocab[first], vocab[last]


def sentencepiece_model(tokenizer: dict) -> tuple[bytes, bytes, dict] | None:
    """(model, normalizer-only model, ids) for a parsed ``tokenizer.json`` this module
    reproduces, else None (the caller keeps ``tokenizers``).  ``ids``: bos, eos, pad, unk and
    the lone ``"▁"`` piece."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "Unigram" or model.get("byte_fallback") or not model.get("vocab"):
        return None
    charsmap = _charsmap(tokenizer)
    if charsmap is None or not _metaspace(tokenizer):
        return None
    pieces = model["vocab"]
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    frame = _frame(tokenizer, vocab)
    unk = model.get("unk_id")
    added = tokenizer.get("added_tokens") or []
    if frame is None or unk is None or WHITESPACE_PIECE not in vocab or "<pad>" not in vocab:
        return None
    if any(not a.get("special") or vocab.get(a.get("content")) != a.get("id") for a in added):
        return None  # a non-special added token would be matched in the text: not reproduced
    control = {a["id"] for a in added}
    out = bytearray()
    for i, (piece, score) in enumerate(pieces):
        kind = _UNKNOWN if i == unk else _CONTROL if i in control else _NORMAL
        out += _bytes(1, _bytes(1, piece.encode("utf-8")) + _float(2, score) + _int(3, kind))
    bos, eos = frame
    pad = vocab["<pad>"]
    # TrainerSpec: model_type 3, vocab_size 4, unk_id 40, bos_id 41, eos_id 42, pad_id 43.
    out += _bytes(2, _int(3, _UNIGRAM) + _int(4, len(pieces)) + _int(40, unk) + _int(41, bos)
                  + _int(42, eos) + _int(43, pad))
    out += _bytes(3, _normalizer_spec(charsmap, whitespace_rules=True))
    plain = _bytes(3, _normalizer_spec(charsmap, whitespace_rules=False))
    ids = {"bos": bos, "eos": eos, "pad": pad, "unk": unk, "space": vocab[WHITESPACE_PIECE]}
    return bytes(out), plain, ids


class UnigramTokenizer:
    """Encodes with SentencePiece what ``tokenizers`` would encode from the same file (see
    the module docstring for the one difference)."""

    def __init__(self, model: bytes, normalizer: bytes, ids: dict, max_length: int):
        import sentencepiece as spm

        if max_length < 3:
            raise ValueError(f"max_length {max_length} leaves no room between <s> and </s>")
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self._norm = spm.SentencePieceNormalizer(model_proto=normalizer)
        self.ids, self.max_length = ids, max_length
        self.pad_id = ids["pad"]

    @classmethod
    def from_tokenizer_json(cls, tokenizer: dict, max_length: int) -> "UnigramTokenizer | None":
        built = sentencepiece_model(tokenizer)
        return None if built is None else cls(*built, max_length=max_length)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        keep = self.max_length - 2
        out = []
        for text in texts:
            # One call per text: the list form of encode costs 50-75 us a call before any
            # work (a lone query), one string about 3 us (benchmarks/tokenizer_engines.py).
            ids = self._sp.encode(text)
            if self._norm.normalize(text).endswith(" "):
                ids.append(self.ids["space"])
            out.append([self.ids["bos"], *ids[:keep], self.ids["eos"]])
        return out
