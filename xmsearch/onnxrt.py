"""ONNX Runtime session options for CPU, built in one place.

The served ONNX members (``xmsearch.triton_models``, inside python-backend stubs) and the
in-process sessions of export checks, training features and benchmarks
(``xmsearch.export.onnx.onnx_session``) take their options from here.  Kept free of torch,
which the stubs do not load.
"""

from __future__ import annotations

# ONNX Runtime's session switches for its intra-op workers' spinning, by our short names.
SPIN_ENTRIES = {"allow_spinning": "session.intra_op.allow_spinning",
                "force_spinning_stop": "session.force_spinning_stop"}


def cpu_session_options(threads: int | None = None, **spin: str):
    """SessionOptions for ONNX Runtime on CPU, all graph optimisations on: ``threads``
    intra-op threads and one inter-op thread (None: ONNX Runtime's own choice for both),
    and the spinning switches of ``SPIN_ENTRIES`` given as "0" / "1" (absent: ONNX Runtime's
    defaults).  The served members (``xmsearch.triton_models``) and the in-process sessions
    (``xmsearch.export.onnx.onnx_session``) are built here alike."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    for key, value in spin.items():
        opts.add_session_config_entry(SPIN_ENTRIES[key], value)
    return opts


# Initializers at least this large are shared between sessions of one model (shared_initializers).
SHARE_MIN_BYTES = 1 << 22


def shared_initializers(path, min_bytes: int = SHARE_MIN_BYTES) -> dict:
    """The large initializers of the ONNX model at ``path`` as CPU OrtValues, by name.

    Handed to every session of the model through ``SessionOptions.add_initializer``, they
    are read in place, so a second session of the same graph (``OnnxModel``'s one-row
    session) does not hold a second copy of them: for the int8 e5 text encoder that is its
    384 MB word-embedding table, its one initializer this large.  What the second session
    still costs a served repository is measured by ``benchmarks.serving_ab`` (server PSS,
    ``benchmarks/results/serving_ab_single.md``).
    Each OrtValue keeps its numpy array alive; the caller keeps the dict while the
    sessions live.
    """
    import math

    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    def size(init) -> int:
        return math.prod(init.dims) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize

    model = onnx.load(str(path))
    return {init.name: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(init))
            for init in model.graph.initializer if size(init) >= min_bytes}
