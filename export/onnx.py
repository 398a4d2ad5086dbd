"""PyTorch -> ONNX for the three model kinds, each export checked numerically.

The model spec (xmsearch.spec) gives input/output names and dynamic axes; after the
export, ``onnx.checker`` validates the graph and ONNX Runtime runs it on real inputs
(other batch sizes and sequence lengths than the trace used, so a baked-in shape shows
up) and is compared with PyTorch.  A failed comparison is a typed error listing the max
absolute error and the minimum cosine per output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xmsearch.errors import ModelError
from xmsearch.spec import ModelSpec

OPSET = 17


@dataclass(frozen=True)
class ParityReport:
    model: str
    output: str
    max_abs_error: float
    min_cosine: float
    cases: int

    def __str__(self) -> str:
        return (f"{self.model}.{self.output}: max |err| {self.max_abs_error:.2e}, "
                f"min cosine {self.min_cosine:.6f} over {self.cases} cases")


def export_onnx(module: torch.nn.Module, spec: ModelSpec, example: tuple[torch.Tensor, ...],
                path: Path) -> Path:
    """Export ``module(*example)`` to ``path`` with the spec's names and dynamic axes."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {t.name: t.onnx_dynamic_axes for t in (*spec.inputs, *spec.outputs)}
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is the stable one for dynamic sequence axes of HF BERT
        # models; its deprecation and tracer warnings are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example, str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True,
            dynamo=False)
    _pin_declared_shapes(path, spec)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelError(f"exported {spec.name} graph {path} fails onnx.checker: {e}") from e
    return path


def _pin_declared_shapes(path: Path, spec: ModelSpec) -> None:
    """Declare the spec's shapes on the graph's inputs and outputs.

    The TorchScript exporter gives every output dimension it cannot prove constant a
    generated name (the embedding width comes out as ``DivEMBEDDING_dim_1``), so readers
    of the graph (Triton, TensorRT, the config tests) would see a dynamic axis where the
    spec promises 256.  The checker's full shape inference then verifies the pinned sizes.
    """
    import onnx

    model = onnx.load(str(path))
    declared = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        t = declared.get(value.name)
        if t is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(t.dims) + 1:
            raise ModelError(f"exported {spec.name} graph {path}: {value.name} has rank {len(dims)}, "
                             f"the spec says batch + {list(t.dims)}; fix the model or the spec")
        names = iter(t.axis_names)
        dims[0].dim_param = "batch"  # dim_param and dim_value are a oneof: setting one clears the other
        for dim, size in zip(dims[1:], t.dims):
            if size == -1:
                dim.dim_param = next(names)
            else:
                dim.dim_value = size
    onnx.save(model, str(path))


def onnx_session(path: Path, threads: int = 0, spinning: bool = True, spin_stop: bool = False):
    """A CPU ONNX Runtime session; ``spinning=False`` keeps idle intra-op threads from
    busy-waiting (they would take cores from other work in the same process);
    ``spin_stop=True`` lets them spin inside a run only (``session.force_spinning_stop``)."""
    import onnxruntime as ort

    from xmsearch.onnxrt import cpu_session_options

    spin = {}
    if not spinning:
        spin["allow_spinning"] = "0"
    if spin_stop:
        spin["force_spinning_stop"] = "1"
    return ort.InferenceSession(str(path), cpu_session_options(threads or None, **spin),
                                providers=["CPUExecutionProvider"])


def check_parity(module: torch.nn.Module, spec: ModelSpec, path: Path,
                 cases: list[tuple[torch.Tensor, ...]], min_cosine: float = 0.9999, session=None,
                 label: str | None = None) -> list[ParityReport]:
    """Run PyTorch and ONNX Runtime on every case; raise ModelError below ``min_cosine``.

    Cosine is taken per row over the flattened non-batch dims; rows masked out of a
    sequence (padding) still count, which is stricter than the embedding-level check.
    ``session``: one already open on ``path``; ``label``: the reports' model name (default
    the spec's).
    """
    sess = session or onnx_session(path)
    names_in = [t.name for t in spec.inputs]
    worst: dict[str, list[float]] = {t.name: [0.0, 1.0] for t in spec.outputs}
    for case in cases:
        with torch.no_grad():
            ref = module(*case)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = sess.run([t.name for t in spec.outputs],
                       {n: x.numpy() for n, x in zip(names_in, case)})
        for t, r, g in zip(spec.outputs, refs, got):
            r = r.numpy().astype(np.float64)
            g = np.asarray(g, dtype=np.float64)
            if r.shape != g.shape:
                raise ModelError(f"{spec.name}.{t.name}: ONNX output shape {g.shape} != PyTorch {r.shape}")
            err = float(np.max(np.abs(r - g))) if r.size else 0.0
            rf, gf = r.reshape(r.shape[0], -1), g.reshape(g.shape[0], -1)
            cos = np.sum(rf * gf, 1) / np.maximum(np.linalg.norm(rf, axis=1) * np.linalg.norm(gf, axis=1), 1e-12)
            worst[t.name][0] = max(worst[t.name][0], err)
            worst[t.name][1] = min(worst[t.name][1], float(cos.min()))
    reports = [ParityReport(label or spec.name, n, e, c, len(cases)) for n, (e, c) in worst.items()]
    bad = [r for r in reports if not r.min_cosine >= min_cosine]
    if bad:
        raise ModelError("ONNX parity check failed (need cosine >= %g): %s"
                         % (min_cosine, "; ".join(str(r) for r in bad)))
    return reports
