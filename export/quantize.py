"""Dynamic int8 quantization of the text encoder and fusion graphs for CPU serving, one
scale per token.

The text encoder is the largest CPU cost of an item after the photo (about as much as
the image encoder per title for the 12-layer e5) and the whole cost of a text query; the
fusion module's item graph is the next (its cross-attention over 49 regions and the title's
tokens, about 13% of an ingested item's CPU in fp32).  :func:`quantize_int8` rewrites every
``MatMul`` with a constant weight so the product runs on the CPU's int8 dot-product units
(VNNI / AMX) with no calibration set:

* the weight is stored as int8 with one scale per output channel (symmetric, [-127, 127]);
* the activation is quantized when the graph runs, with **one scale per token** (its
  largest magnitude maps to 127), as uint8 with zero point 128;
* ONNX Runtime's ``MatMulIntegerToFloat`` multiplies the two and applies both scales.

One scale per token, not per run, is what makes a row's result its own: ONNX Runtime's
``quantize_dynamic`` takes one activation scale over the whole tensor, so under Triton's
dynamic batching a title's vector moved with whatever shared its batch (up to 0.26 per
value, cosine 0.993, for the same title alone and among 15 others).  With a scale per
token a row is computed the same alone or batched, and padding never enters a real
token's scale.  It is also closer to fp32 (per-token cosine with PyTorch 0.993 against
0.965 for the e5 encoder), for a little more time per call than one scale per run (the
scales are separate graph nodes, not fused into the product): measured side by side in
``benchmarks/results/text_int8.md``.

Embedding tables, layer norms, softmax and the attention products between activations
stay fp32, and the quantized graph is checked against the PyTorch module like every fp32
graph, with its own lower bound (:data:`INT8_MIN_COSINE` per token state of the text
encoder, :data:`FUSION_INT8_MIN_COSINE` per fused embedding), and for batch independence
(:data:`INT8_MAX_BATCH_DRIFT`).  What int8 costs in retrieval quality is measured end to
end on a catalogue (``xmsearch eval``; README, "Text encoder precision", "Fusion precision").

``MatMulIntegerToFloat`` is an ONNX Runtime operator (``com.microsoft``), and these graphs
run on its CPU provider only; GPU targets use TensorRT's own FP16 / INT8 instead.
"""

from __future__ import annotations

from pathlib import Path

from xmsearch.errors import ModelError

PRECISIONS = ("auto", "fp32", "int8")

# Lowest cosine of one real token's state, int8 graph vs PyTorch fp32 (padding positions
# excluded).  Measured over 512 demo titles: MiniLM-L6 0.988, multilingual-e5-small-q4 0.993
# (benchmarks/results/text_int8.md); one activation scale per run gave 0.963 / 0.965, weights
# with one scale per tensor instead of one per output channel 0.86-0.94, and a broken graph
# lands far lower.  Kept loose: other catalogues' texts may sit lower than the demo's titles.
INT8_MIN_COSINE = 0.93

# Largest |difference| allowed between a row's states computed alone (at its own length) and
# in a batch with other rows (check_batch_independence).  Measured 0 for the per-token graph;
# the per-run activation scale of onnxruntime's quantize_dynamic gave 0.26 (e5) and 0.53 (MiniLM-L6).
INT8_MAX_BATCH_DRIFT = 1e-3

# Lowest cosine of a fused embedding, int8 fusion graph vs the PyTorch module in fp32, on the
# export's parity cases (token states and regions from the real encoders).  Measured on the
# demo checkpoint: 0.99984-0.99995 over the four graphs (benchmarks/results/fusion_int8.md).
# Kept loose, like the text encoder's bound.
FUSION_INT8_MIN_COSINE = 0.995


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


def resolve_precision(requested: str, on_gpu: bool, int8_cpu: bool | None = None, what: str = "text") -> str:
    """``auto`` -> int8 where the ``what`` graphs (text or fusion) run on ONNX Runtime's CPU
    provider of a CPU with int8 dot products (:func:`cpu_has_int8_dot_product`, or
    ``int8_cpu``), else fp32."""
    if requested not in PRECISIONS:
        raise ModelError(f"{what} precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if on_gpu:
            return "fp32"
        return "int8" if (cpu_has_int8_dot_product() if int8_cpu is None else int8_cpu) else "fp32"
    if requested == "int8" and on_gpu:
        raise ModelError(f"{what} precision int8 is dynamic ONNX Runtime quantization, which runs on the CPU "
                         "provider only: use it with --target cpu (or onnxruntime --device cpu); on a GPU "
                         "use --target tensorrt --precision fp16|int8")
    return requested


def quantize_int8(src: Path, dst: Path) -> Path:
    """Write the int8 version of the ONNX graph ``src`` to ``dst``: weights per output channel,
    activations per token (module docstring).  Raises ModelError when no ``MatMul`` had a
    constant 2-D weight to quantize, or the result fails ``onnx.checker``."""
    import onnx

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    if rewrite_matmuls_int8(model) == 0:
        ops = {n.op_type for n in model.graph.node}
        raise ModelError(f"int8 quantization of {src} changed no MatMul (ops: {', '.join(sorted(ops))})")
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst))
    try:
        onnx.checker.check_model(str(dst))
    except onnx.checker.ValidationError as e:
        raise ModelError(f"int8 graph {dst} fails onnx.checker: {e}") from e
    return dst


def rewrite_matmuls_int8(model) -> int:
    """Rewrite, in place, every ``MatMul`` of ``model`` whose second input is a 2-D float
    initializer as the per-token int8 product of the module docstring; returns how many.

    Activations feeding several such products (a layer's query, key and value
    projections) are quantized once.  The nodes that quantize an activation go where its
    first product was, so the graph stays in topological order.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 10:
        raise ModelError(f"int8 quantization needs ONNX opset >= 10 (QuantizeLinear); this graph has opset {opset}")
    graph = model.graph
    weights = {i.name: i for i in graph.initializer
               if len(i.dims) == 2 and i.data_type == TensorProto.FLOAT}
    added: list = []

    def const(name: str, value) -> str:
        added.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    prefix = "int8q"
    to_127 = const(f"{prefix}/to_127", np.float32(1.0 / 127.0))
    zero_point = const(f"{prefix}/zero_point", np.uint8(128))
    unit = const(f"{prefix}/unit", np.float32(1.0))
    last_axis = const(f"{prefix}/last_axis", np.array([-1], np.int64)) if opset >= 18 else None

    def reduce_max(x: str, y: str):  # over the last axis; opset 18 moved ``axes`` to an input
        if last_axis:
            return helper.make_node("ReduceMax", [x, last_axis], [y], keepdims=1)
        return helper.make_node("ReduceMax", [x], [y], axes=[-1], keepdims=1)

    rows: dict[str, tuple[str, str]] = {}  # activation -> (its uint8 codes, token scales [..., 1])
    nodes, replaced, products = [], set(), 0
    for node in graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None:
            nodes.append(node)
            continue
        a = node.input[0]
        if a not in rows:
            # Scales from the activation as it is ([..., tokens, K] -> [..., tokens, 1]); the
            # tokens divided by them, then QuantizeLinear with scalar scale 1 and zero point 128
            # (one node, no reshape to the [tokens, K] view that a per-row QuantizeLinear would
            # need).  A token of zeros gets scale 0: whatever its codes, its product is 0 x codes.
            p = f"{prefix}/a{len(rows)}"
            nodes += [
                helper.make_node("Abs", [a], [f"{p}/abs"]),
                reduce_max(f"{p}/abs", f"{p}/max"),
                helper.make_node("Mul", [f"{p}/max", to_127], [f"{p}/scale"]),
                helper.make_node("Reciprocal", [f"{p}/scale"], [f"{p}/inverse"]),
                helper.make_node("Mul", [a, f"{p}/inverse"], [f"{p}/scaled"]),
                helper.make_node("QuantizeLinear", [f"{p}/scaled", unit, zero_point], [f"{p}/q"]),
            ]
            rows[a] = (f"{p}/q", f"{p}/scale")
        q, scale = rows[a]
        weight = numpy_helper.to_array(w).astype(np.float32)
        w_scale = (np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0).astype(np.float32)
        w_int8 = np.clip(np.round(weight / w_scale), -127, 127).astype(np.int8)
        p = f"{prefix}/p{products}"
        # ONNX Runtime's kernel multiplies the product by a non-scalar a_scale / b_scale with
        # broadcasting (ScaleOutput in contrib_ops/cpu/quantization/dynamic_quantize_matmul.cc):
        # scales [..., tokens, 1] and [N] give the per-token, per-channel result.  check_int8_parity
        # holds the graph to PyTorch on the runtime that serves it.
        nodes.append(helper.make_node(
            "MatMulIntegerToFloat", [q, const(f"{p}/w_int8", w_int8), scale, const(f"{p}/w_scale", w_scale),
                                     zero_point], [node.output[0]], domain="com.microsoft"))
        replaced.add(w.name)
        products += 1
    if not products:
        return 0
    still_used = {i for nd in nodes for i in nd.input}
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in still_used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return products


def check_int8_parity(module, path: Path, cases: list[tuple], min_cosine: float = INT8_MIN_COSINE,
                      session=None):
    """Compare the int8 graph at ``path`` with the fp32 PyTorch text encoder on ``cases``.

    Cosine per real token (padding positions excluded: the fusion masks them out), so the
    figure is what the fusion reads.  Raises ModelError below ``min_cosine``; returns the
    ParityReport otherwise.  ``session``: an ONNX Runtime session of ``path`` already open
    (else one is opened here).
    """
    import numpy as np
    import torch

    from xmsearch.export.onnx import ParityReport, onnx_session
    from xmsearch.spec import ATTENTION_MASK, INPUT_IDS, TEXT_ENCODER, TOKEN_STATES

    sess = session or onnx_session(path)
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


def batch_drift(session, ids, mask, rows: int | None = None) -> float:
    """Largest |difference|, over real tokens, between the text encoder ``session``'s states
    for the first ``rows`` rows of ``ids`` / ``mask`` (all when None) in their batch and for
    each row alone, trimmed to its own length."""
    import numpy as np

    from xmsearch.spec import ATTENTION_MASK, INPUT_IDS, TOKEN_STATES

    batched = session.run([TOKEN_STATES], {INPUT_IDS: ids, ATTENTION_MASK: mask})[0]
    drift = 0.0
    for r in range(len(ids) if rows is None else min(rows, len(ids))):
        n = int(mask[r].sum())
        alone = session.run([TOKEN_STATES], {INPUT_IDS: ids[r:r + 1, :n], ATTENTION_MASK: mask[r:r + 1, :n]})[0][0]
        drift = max(drift, float(np.max(np.abs(alone - batched[r, :n]))))
    return drift


def check_batch_independence(path: Path, cases: list[tuple], rows: int = 4,
                             max_drift: float = INT8_MAX_BATCH_DRIFT, session=None) -> float:
    """:func:`batch_drift` of the text encoder graph at ``path`` (``session``: one already open
    on it) over the first ``rows`` rows of ``cases[0]``.  A served vector must not depend on
    what Triton's dynamic batcher put next to it: raises ModelError above ``max_drift``."""
    from xmsearch.export.onnx import onnx_session
    from xmsearch.spec import TEXT_ENCODER

    ids, mask = (t.numpy() for t in cases[0])
    drift = batch_drift(session or onnx_session(path), ids, mask, rows)
    if not drift <= max_drift:
        raise ModelError(f"{TEXT_ENCODER} graph {path}: a row's states alone and in a batch of {len(ids)} differ "
                         f"by up to {drift:.3g} (allowed {max_drift:g}): served vectors would depend on their "
                         "batch-mates; export with --text-precision fp32")
    return drift


def check_rows_independent(session, spec, case: tuple, rows: int = 4,
                           max_drift: float = INT8_MAX_BATCH_DRIFT) -> float:
    """Largest |difference| of any output between the first ``rows`` rows of ``case`` run as
    one batch through ``session`` (a graph of member ``spec``) and each row run alone (at
    the batch's sequence length: padding is masked inside the graph).  Raises ModelError
    above ``max_drift``: a served vector must not depend on its batch-mates."""
    import numpy as np

    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    feeds = {n: x.numpy() for n, x in zip(names_in, case)}
    batched = session.run(names_out, feeds)
    drift = 0.0
    for r in range(min(rows, len(case[0]))):
        alone = session.run(names_out, {n: x[r:r + 1] for n, x in feeds.items()})
        drift = max(drift, *(float(np.max(np.abs(a[0] - b[r]))) for a, b in zip(alone, batched)))
    if not drift <= max_drift:
        raise ModelError(f"{spec.name}: a row's outputs alone and in a batch of {len(case[0])} differ by up to "
                         f"{drift:.3g} (allowed {max_drift:g}): served vectors would depend on their "
                         "batch-mates")
    return drift
