"""Dynamic int8 quantization of the text encoder graph for CPU serving.

The text encoder is the largest CPU cost of an item after the photo (about as much as
the image encoder per title for the 12-layer e5) and the whole cost of a text query.
ONNX Runtime's dynamic quantization stores each ``MatMul`` weight as int8 with one scale
per output channel and quantizes the activations per call (uint8, one scale per tensor),
so the products run on the CPU's int8 dot-product units (VNNI / AMX) with no calibration
set: measured in ``benchmarks/results/text_int8.md``.

Only ``MatMul`` is quantized (the embedding tables, layer norms and softmax stay fp32), and
the quantized graph is checked against the PyTorch encoder like every fp32 graph, with its
own lower bound (:data:`INT8_MIN_COSINE`): the bound catches a graph that quantization
broke (activation outliers, a wrong op), while what int8 costs in retrieval quality is
measured end to end on a catalogue (``xmsearch eval``; README, "Text encoder precision").

Dynamic int8 graphs run on ONNX Runtime's CPU provider only (its CUDA provider has no
kernel for ``DynamicQuantizeMatMul``); GPU targets use TensorRT's own FP16 / INT8 instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

from xmsearch.errors import ModelError

TEXT_PRECISIONS = ("auto", "fp32", "int8")

# Lowest cosine of one real token's state, int8 graph vs PyTorch fp32 (padding positions
# excluded).  Measured over 512 demo titles: MiniLM-L6 0.963, multilingual-e5-small-q4 0.965
# (benchmarks/results/text_int8.md); weights with one scale per tensor instead of one per
# output channel gave 0.86-0.94, and a broken graph lands far lower.
INT8_MIN_COSINE = 0.93


def cpu_has_int8_dot_product() -> bool:
    """Whether this CPU multiplies int8 with VNNI / AMX (x86) or is an ARM64 CPU (SDOT).

    On x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 products go through an instruction
    whose int16 sums can saturate (onnxruntime's quantization docs), which costs accuracy;
    there ``auto`` keeps the fp32 graph.
    """
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # not Linux: no cheap way to tell, stay with fp32
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def resolve_text_precision(requested: str, on_gpu: bool, int8_cpu: bool | None = None) -> str:
    """``auto`` -> int8 where the text encoder runs on ONNX Runtime's CPU provider of a CPU
    with int8 dot products (:func:`cpu_has_int8_dot_product`, or ``int8_cpu``), else fp32."""
    if requested not in TEXT_PRECISIONS:
        raise ModelError(f"text precision {requested!r}: choose one of {', '.join(TEXT_PRECISIONS)}")
    if requested == "auto":
        if on_gpu:
            return "fp32"
        return "int8" if (cpu_has_int8_dot_product() if int8_cpu is None else int8_cpu) else "fp32"
    if requested == "int8" and on_gpu:
        raise ModelError("text precision int8 is dynamic ONNX Runtime quantization, which runs on the CPU "
                         "provider only: use it with --target cpu (or onnxruntime --device cpu); on a GPU "
                         "use --target tensorrt --precision fp16|int8")
    return requested


def quantize_int8(src: Path, dst: Path) -> Path:
    """Write the dynamically int8-quantized version of the ONNX graph ``src`` to ``dst``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    quant_log = logging.getLogger()  # onnxruntime.quantization warns through the root logger
    level = quant_log.level
    quant_log.setLevel(logging.ERROR)  # its "run pre-processing first" advice concerns static quantization
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
    finally:
        quant_log.setLevel(level)
    ops = {n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node}
    if not ops & {"DynamicQuantizeMatMul", "MatMulInteger"}:
        raise ModelError(f"int8 quantization of {src} changed no MatMul (ops: {', '.join(sorted(ops))})")
    try:
        onnx.checker.check_model(str(dst))
    except onnx.checker.ValidationError as e:
        raise ModelError(f"int8 graph {dst} fails onnx.checker: {e}") from e
    return dst


def check_int8_parity(module, path: Path, cases: list[tuple], min_cosine: float = INT8_MIN_COSINE):
    """Compare the int8 graph at ``path`` with the fp32 PyTorch text encoder on ``cases``.

    Cosine per real token (padding positions excluded: the fusion masks them out), so the
    figure is what the fusion reads.  Raises ModelError below ``min_cosine``; returns the
    ParityReport otherwise.
    """
    import numpy as np
    import torch

    from xmsearch.export.onnx import ParityReport, onnx_session
    from xmsearch.spec import ATTENTION_MASK, INPUT_IDS, TEXT_ENCODER, TOKEN_STATES

    sess = onnx_session(path)
    worst_err, worst_cos = 0.0, 1.0
    for ids, mask in cases:
        with torch.no_grad():
            ref = module(ids, mask).numpy().astype(np.float64)
        got = sess.run([TOKEN_STATES], {INPUT_IDS: ids.numpy(), ATTENTION_MASK: mask.numpy()})[0].astype(np.float64)
        if got.shape != ref.shape:
            raise ModelError(f"{TEXT_ENCODER} int8: output shape {got.shape} != PyTorch {ref.shape}")
        real = mask.numpy().astype(bool)
        r, g = ref[real], got[real]
        cos = np.sum(r * g, 1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1), 1e-12)
        worst_err = max(worst_err, float(np.max(np.abs(r - g))))
        worst_cos = min(worst_cos, float(cos.min()))
    report = ParityReport(f"{TEXT_ENCODER} (int8)", TOKEN_STATES, worst_err, worst_cos, len(cases))
    if not worst_cos >= min_cosine:
        raise ModelError(f"int8 text encoder parity check failed (need cosine >= {min_cosine:g} per token): "
                         f"{report}; export with --text-precision fp32")
    return report
