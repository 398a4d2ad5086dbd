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


# Initializers at least this large are shared between sessions of one model (shared_initializers)
# and, in the cpu target's repository, stored beside the graph (external_data_file).
SHARE_MIN_BYTES = 1 << 22
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data


def external_data_file(path):
    """Where ``store_large_initializers_outside`` puts the graph's large initializers."""
    from pathlib import Path

    return Path(str(path) + EXTERNAL_DATA_SUFFIX)


def _nbytes(init) -> int:
    """Size of an ONNX initializer's data (TensorProto), from its dims and type alone."""
    import math

    from onnx import helper

    return math.prod(init.dims) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def store_large_initializers_outside(path, min_bytes: int = SHARE_MIN_BYTES) -> bool:
    """Rewrite the ONNX model at ``path`` with its initializers of at least ``min_bytes`` in one
    raw file beside it (ONNX external data, ``external_data_file``), which
    ``shared_initializers`` maps into memory.  Returns whether any initializer moved; a model
    with none that large is left as it was."""
    from pathlib import Path

    import onnx

    model = onnx.load(str(path))
    if not any(_nbytes(i) >= min_bytes for i in model.graph.initializer):
        return False
    target = external_data_file(path)
    if target.exists():
        target.unlink()  # onnx appends to an existing file
    mode = Path(path).stat().st_mode & 0o777
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=target.name, size_threshold=min_bytes, convert_attribute=False)
    target.chmod(mode)  # onnx creates it owner-only; a server running as another user reads both
    return True


def shared_initializers(path, min_bytes: int = SHARE_MIN_BYTES) -> dict:
    """The large initializers of the ONNX model at ``path`` as CPU OrtValues, by name.

    Handed to every session of the model through ``SessionOptions.add_initializer``, they
    are read in place, so a second session of the same graph (``OnnxModel``'s one-row
    session) does not hold a second copy of them: for the int8 e5 text encoder that is its
    384 MB word-embedding table, its one initializer this large.  Those stored as external
    data (``store_large_initializers_outside``, the cpu target's repository) are mapped
    read-only from their file instead of copied: the pages are the page cache's, shared by
    every process that maps the file (the text encoder's two instances), and only the rows
    that queries look up are ever read in.  What the sessions still cost a served repository
    is measured by ``benchmarks.serving_ab`` (server PSS, ``benchmarks/results/serving_ab_single.md``).
    Each OrtValue keeps its numpy array alive; the caller keeps the dict while the
    sessions live.
    """
    from pathlib import Path

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    def mapped(init):
        where = {e.key: e.value for e in init.external_data}
        return np.memmap(Path(path).parent / where["location"], dtype=helper.tensor_dtype_to_np_dtype(init.data_type),
                         mode="r", offset=int(where.get("offset", 0)), shape=tuple(init.dims))

    model = onnx.load(str(path), load_external_data=False)
    shared = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            shared[init.name] = ort.OrtValue.ortvalue_from_numpy(mapped(init))
        elif _nbytes(init) >= min_bytes:
            shared[init.name] = ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(init))
    return shared
