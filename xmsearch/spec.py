"""One declared spec per served model.

The same spec drives the ONNX export (input/output names, dynamic axes), the TensorRT
optimisation profiles and the generated ``config.pbtxt``: change a name here and every
consumer follows.  Dims exclude the batch dimension (Triton's ``max_batch_size``
convention); ``-1`` marks a dynamic axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Ensemble (public) names: what users and the client call.
QUERY_TEXT = "query_text"
QUERY_IMAGE = "query_image"
QUERY_TEXT_IMAGE = "query_text_image"
ITEM = "item"
ENSEMBLES = (QUERY_TEXT, QUERY_IMAGE, QUERY_TEXT_IMAGE, ITEM)

# Member model names.
TOKENIZER_QUERY = "tokenizer_query"
TOKENIZER_ITEM = "tokenizer_item"
IMAGE_PREPROCESS = "image_preprocess"
TEXT_ENCODER = "text_encoder"
IMAGE_ENCODER = "image_encoder"
FUSION_TEXT = "fusion_text"
FUSION_IMAGE = "fusion_image"
FUSION_JOINT = "fusion_joint"

# Tensor names shared by the client, the ensembles and the members.
TEXT = "TEXT"  # BYTES [1]: UTF-8 text
IMAGE = "IMAGE"  # BYTES [1]: encoded JPEG/PNG/WebP
INPUT_IDS = "INPUT_IDS"  # INT64 [-1]
ATTENTION_MASK = "ATTENTION_MASK"  # INT64 [-1]
PIXEL_VALUES = "PIXEL_VALUES"  # FP32 [3, H, W]
TOKEN_STATES = "TOKEN_STATES"  # FP32 [-1, text_dim]
IMAGE_REGIONS = "IMAGE_REGIONS"  # FP32 [regions, image_dim]
EMBEDDING = "EMBEDDING"  # FP32 [embed_dim], L2-normalised

# Model-config parameter carrying the fingerprint of the weights behind an ensemble.
FINGERPRINT_PARAMETER = "xmsearch_fingerprint"
EMBED_DIM_PARAMETER = "xmsearch_embed_dim"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "object" (BYTES)
    dims: tuple[int, ...]  # without the batch dimension
    # ONNX dynamic-axis names for the -1 dims (batch is always "batch").
    axis_names: tuple[str, ...] = ()
    optional: bool = False

    @property
    def triton_dtype(self) -> str:
        return {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                "object": "TYPE_STRING", "bool": "TYPE_BOOL"}[self.dtype]

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
