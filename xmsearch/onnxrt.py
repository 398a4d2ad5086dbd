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
