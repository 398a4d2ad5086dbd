"""One declared spec per served model.

The same spec drives the ONNX export (input/output names, dynamic axes), the TensorRT
optimisation profiles and the generated ``config.pbtxt``: change a name here and every
consumer follows.  Dims exclude the batch dimension (Triton's ``max_batch_size``
convention); ``-1`` marks a dynamic axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

# Model names users pass on the command line (kept here, not in xmsearch.models, so that
# building the CLI parser does not import torch).
DEFAULT_TEXT_MODEL = "minilm-l6"
DEFAULT_IMAGE_MODEL = "efficientnet-lite0"
IMAGE_MODELS = ("efficientnet-lite0", "resnet18", "resnet34", "resnet50")

# Ensemble (public) names: what users and the client call.
QUERY_TEXT = "query_text"
QUERY_IMAGE = "query_image"
QUERY_TEXT_IMAGE = "query_text_image"
ITEM = "item"
ENSEMBLES = (QUERY_TEXT, QUERY_IMAGE, QUERY_TEXT_IMAGE, ITEM)

# Member model names.
TOKENIZER_QUERY = "tokenizer_query"  # TEXT -> ids, mask (query role)
IMAGE_PREPROCESS = "image_preprocess"  # IMAGE -> pixels
JOINT_PREPROCESS = "joint_preprocess"  # TEXT, IMAGE -> ids, mask, pixels (query role)
ITEM_PREPROCESS = "item_preprocess"  # TEXT, IMAGE -> ids, mask, pixels (passage role)
# The e5 role each text-reading preprocessing member applies (prefix "query: " / "passage: ").
TEXT_ROLES = {TOKENIZER_QUERY: "query", JOINT_PREPROCESS: "query", ITEM_PREPROCESS: "passage"}
IMAGE_READERS = (IMAGE_PREPROCESS, JOINT_PREPROCESS, ITEM_PREPROCESS)
PREPROCESSING = (TOKENIZER_QUERY, IMAGE_PREPROCESS, JOINT_PREPROCESS, ITEM_PREPROCESS)
TEXT_ENCODER = "text_encoder"
IMAGE_ENCODER = "image_encoder"
FUSION_TEXT = "fusion_text"
FUSION_IMAGE = "fusion_image"
FUSION_JOINT = "fusion_joint"  # text+image queries
FUSION_ITEM = "fusion_item"  # catalogue items (title + photo): same inputs, the item-side weights

# Tensor names shared by the client, the ensembles and the members.
TEXT = "TEXT"  # BYTES [1]: UTF-8 text
IMAGE = "IMAGE"  # BYTES [1]: encoded JPEG/PNG/WebP
INPUT_IDS = "INPUT_IDS"  # INT64 [-1]
ATTENTION_MASK = "ATTENTION_MASK"  # INT64 [-1]
PIXEL_VALUES = "PIXEL_VALUES"  # UINT8 [3, H, W]: RGB 0-255, the image encoder normalises
TOKEN_STATES = "TOKEN_STATES"  # FP32 [-1, text_dim]
IMAGE_REGIONS = "IMAGE_REGIONS"  # FP32 [regions, image_dim]
EMBEDDING = "EMBEDDING"  # FP32 [embed_dim], L2-normalised
# FP32 [embed_dim], L2-normalised: a catalogue item's photo-side vector (the item ensemble's
# second output), by which the index ranks the candidates of a photo query again.
PHOTO_EMBEDDING = "PHOTO_EMBEDDING"

# In the cpu target's text encoder folder: the fusion_text graph, which answers query_text there.
QUERY_HEAD_FILE = "query_head.onnx"

# Model-config parameter carrying the fingerprint of the weights behind an ensemble.
FINGERPRINT_PARAMETER = "xmsearch_fingerprint"
EMBED_DIM_PARAMETER = "xmsearch_embed_dim"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "uint8", "object" (BYTES)
    dims: tuple[int, ...]  # without the batch dimension
    # ONNX dynamic-axis names for the -1 dims (batch is always "batch").
    axis_names: tuple[str, ...] = ()
    optional: bool = False

    @property
    def triton_dtype(self) -> str:
        return {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                "uint8": "TYPE_UINT8", "object": "TYPE_STRING", "bool": "TYPE_BOOL"}[self.dtype]

    @property
    def onnx_dynamic_axes(self) -> dict[int, str]:
        axes = {0: "batch"}
        names = iter(self.axis_names)
        for i, d in enumerate(self.dims, start=1):
            if d == -1:
                axes[i] = next(names)
        return axes


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    # For encoders: the largest value of each dynamic non-batch axis (TensorRT profiles).
    max_axis: dict[str, int] = field(default_factory=dict)
    opt_axis: dict[str, int] = field(default_factory=dict)
    min_axis: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Dims:
    """The sizes that fix every tensor shape of a model set."""

    text_dim: int
    image_dim: int
    regions: int = 49
    image_size: int = 224
    embed_dim: int = 256
    max_length: int = 64


def member_specs(d: Dims) -> dict[str, ModelSpec]:
    """The served members with their tensors and batching settings.

    Preferred sizes give the TensorRT optimisation profiles their batch points; the queue
    delays are the batch-forming wait for GPU targets.  The cpu target serves with no
    queue delay (``TargetSettings.queue_delay``): on CPU cores the members batch whatever
    queued while they were busy, and waiting only added latency (benchmarks/results/serving_ab.md).
    """
    text_in = (TensorSpec(INPUT_IDS, "int64", (-1,), ("sequence",)),
               TensorSpec(ATTENTION_MASK, "int64", (-1,), ("sequence",)))
    states = TensorSpec(TOKEN_STATES, "float32", (-1, d.text_dim), ("sequence",))
    mask = TensorSpec(ATTENTION_MASK, "int64", (-1,), ("sequence",))
    regions = TensorSpec(IMAGE_REGIONS, "float32", (d.regions, d.image_dim))
    pixels = TensorSpec(PIXEL_VALUES, "uint8", (3, d.image_size, d.image_size))
    emb = TensorSpec(EMBEDDING, "float32", (d.embed_dim,))
    photo_emb = TensorSpec(PHOTO_EMBEDDING, "float32", (d.embed_dim,))
    text = TensorSpec(TEXT, "object", (1,))
    image = TensorSpec(IMAGE, "object", (1,))
    seq = {"min_axis": {"sequence": 1}, "opt_axis": {"sequence": 16},
           "max_axis": {"sequence": d.max_length}}
    specs = [
        ModelSpec(TOKENIZER_QUERY, (text,), text_in, 64, (8, 16), 500),
        ModelSpec(IMAGE_PREPROCESS, (image,), (pixels,), 64, (8, 16), 500),
        ModelSpec(JOINT_PREPROCESS, (text, image), text_in + (pixels,), 64, (8, 16), 500),
        ModelSpec(ITEM_PREPROCESS, (text, image), text_in + (pixels,), 64, (16, 32), 500),
        ModelSpec(TEXT_ENCODER, text_in, (states,), 64, (8, 16, 32), 2000, **seq),
        ModelSpec(IMAGE_ENCODER, (pixels,), (regions,), 32, (4, 8, 16), 2000),
        ModelSpec(FUSION_TEXT, (states, mask), (emb,), 64, (8, 16, 32), 1000, **seq),
        ModelSpec(FUSION_IMAGE, (regions,), (emb,), 64, (8, 16, 32), 1000),
        ModelSpec(FUSION_JOINT, (states, mask, regions), (emb,), 64, (8, 16, 32), 1000, **seq),
        ModelSpec(FUSION_ITEM, (states, mask, regions), (emb, photo_emb), 64, (16, 32), 1000, **seq),
    ]
    return {s.name: s for s in specs}


@dataclass(frozen=True)
class EnsembleStep:
    model: str
    input_map: dict[str, str]  # member input -> ensemble tensor
    output_map: dict[str, str]  # member output -> ensemble tensor


@dataclass(frozen=True)
class EnsembleSpec:
    name: str
    inputs: tuple[str, ...]
    steps: tuple[EnsembleStep, ...]
    max_batch_size: int = 32


def served_member_specs(d: Dims, text_queries: bool = False) -> dict[str, ModelSpec]:
    """``member_specs`` as the repository serves them.  With ``text_queries`` (the cpu target)
    the text encoder member also reads query text and answers its embedding
    (``xmsearch.triton_models.TextEncoderModel``): a ``TEXT`` input next to ids and mask, all
    three optional (a request sends one kind), and ``EMBEDDING`` after ``TOKEN_STATES``.  The
    ONNX graph keeps ``member_specs``' interface.  ``tokenizer_query`` is then left out: no
    ensemble runs it, and each e5 tokenizer holds about 270 MB (its 250k-piece vocabulary)."""
    specs = member_specs(d)
    if text_queries:
        del specs[TOKENIZER_QUERY]
        enc = specs[TEXT_ENCODER]
        inputs = tuple(replace(t, optional=True) for t in enc.inputs)
        specs[TEXT_ENCODER] = replace(
            enc, inputs=inputs + (TensorSpec(TEXT, "object", (1,), optional=True),),
            outputs=enc.outputs + (TensorSpec(EMBEDDING, "float32", (d.embed_dim,)),))
    return specs


def query_tokenizer_folder(repository: Path) -> Path:
    """The folder of a repository's query-role tokenizer files (``tokenizer.json``,
    ``text_preprocess.json``): ``tokenizer_query``'s, or the text encoder's on the cpu target,
    which tokenizes query text itself and serves no ``tokenizer_query``."""
    own = Path(repository) / TOKENIZER_QUERY / "1"
    return own if own.is_dir() else Path(repository) / TEXT_ENCODER / "1"


def ensemble_specs(text_queries: bool = False) -> dict[str, EnsembleSpec]:
    """Each ensemble runs only the branches its query kind needs.

    With ``text_queries`` (the cpu target, see ``served_member_specs``) ``query_text`` is one
    step, the text encoder member reading the text itself, instead of tokenizer -> text
    encoder -> fusion_text: on python-backend members each step is a stub round trip.  Side by
    side (benchmarks/results/query_text_one_step.md) text queries/s at concurrency 16 1.51x
    with MiniLM-L6 and 1.91x with e5, p50 at concurrency 1 0.75x and 0.97x, for 1.11x / 1.20x
    the server memory (the text encoder's two instances: ``TargetSettings.text_encoder_layout``)
    and catalogue ingest at about 0.9x with MiniLM-L6.
    GPU targets keep three steps: their text encoder is an ONNX Runtime or TensorRT model that
    cannot tokenize.

    The two-input ensembles read TEXT and IMAGE in one first step (``joint_preprocess`` /
    ``item_preprocess``) instead of a tokenizer and an image step side by side.  With two
    parallel branches, a step that refuses its input (a corrupt photo) ends the ensemble
    request while the other branch is still running; tritonserver 2.51 then touches the
    freed request when that branch answers: measured here, about one such refusal in two
    hundred crashed the server (SIGSEGV in the response path) or handed another request a
    corrupted tensor, and a CI run hung on it.  Validating both inputs before any branch starts means a
    refusal always ends a request that has nothing else in flight.
    """
    tok = EnsembleStep(TOKENIZER_QUERY, {TEXT: TEXT},
                       {INPUT_IDS: "input_ids", ATTENTION_MASK: "attention_mask"})
    text_enc = EnsembleStep(TEXT_ENCODER, {INPUT_IDS: "input_ids", ATTENTION_MASK: "attention_mask"},
                            {TOKEN_STATES: "token_states"})
    img_pre = EnsembleStep(IMAGE_PREPROCESS, {IMAGE: IMAGE}, {PIXEL_VALUES: "pixel_values"})

    def both(model: str) -> EnsembleStep:
        return EnsembleStep(model, {TEXT: TEXT, IMAGE: IMAGE},
                            {INPUT_IDS: "input_ids", ATTENTION_MASK: "attention_mask",
                             PIXEL_VALUES: "pixel_values"})

    def fusion_of(model: str, *outputs: str) -> EnsembleStep:
        return EnsembleStep(model, {TOKEN_STATES: "token_states", ATTENTION_MASK: "attention_mask",
                                    IMAGE_REGIONS: "image_regions"}, {o: o for o in (EMBEDDING, *outputs)})

    img_enc = EnsembleStep(IMAGE_ENCODER, {PIXEL_VALUES: "pixel_values"}, {IMAGE_REGIONS: "image_regions"})
    f_text = EnsembleStep(FUSION_TEXT, {TOKEN_STATES: "token_states", ATTENTION_MASK: "attention_mask"},
                          {EMBEDDING: EMBEDDING})
    f_image = EnsembleStep(FUSION_IMAGE, {IMAGE_REGIONS: "image_regions"}, {EMBEDDING: EMBEDDING})
    text_query = ((EnsembleStep(TEXT_ENCODER, {TEXT: TEXT}, {EMBEDDING: EMBEDDING}),) if text_queries
                  else (tok, text_enc, f_text))
    ens = [
        EnsembleSpec(QUERY_TEXT, (TEXT,), text_query),
        EnsembleSpec(QUERY_IMAGE, (IMAGE,), (img_pre, img_enc, f_image)),
        EnsembleSpec(QUERY_TEXT_IMAGE, (TEXT, IMAGE), (both(JOINT_PREPROCESS), text_enc, img_enc,
                                                          fusion_of(FUSION_JOINT))),
        EnsembleSpec(ITEM, (TEXT, IMAGE), (both(ITEM_PREPROCESS), text_enc, img_enc,
                                                 fusion_of(FUSION_ITEM, PHOTO_EMBEDDING))),
    ]
    return {e.name: e for e in ens}
