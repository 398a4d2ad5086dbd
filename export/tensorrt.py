"""ONNX -> TensorRT engines for the ``tensorrt`` target, with the checks around them.

The same :class:`xmsearch.spec.ModelSpec` that drove the ONNX export gives the one
optimisation profile per model (:func:`profiles_for`).  :func:`build_engine` parses the
ONNX graph (every parser error is logged and listed in the raised error), builds with a
persistent timing cache and optional INT8 entropy calibration, and writes a JSON sidecar
next to the plan (``model.plan.json``) naming the TensorRT version and GPU it was built
for.  A plan only loads on the TensorRT version that built it and is tuned for one GPU
(Triton reports "Version tag does not match" otherwise, server issue #7613), so
:func:`check_engine_compat` compares that sidecar with the host before serving.

Everything that decides something -- profiles, the compatibility verdict, the parity
verdict and the retrieval-quality gate -- is a pure function that runs on CPU.  Only
:func:`build_engine`, :func:`run_engine` and :func:`check_engine_parity` need an NVIDIA GPU
and the ``tensorrt`` package (``pip install 'xmsearch[gpu]'``); they are written against
the TensorRT 10 Python API (explicit-batch networks, ``set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3``) and also accept 8.6.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmsearch.errors import ConfigError, InputError, ModelError
from xmsearch.spec import ModelSpec

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

PRECISIONS = ("fp32", "fp16", "int8")
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = 1
REBUILD_HINT = "rebuild with `xmsearch export --target tensorrt`"
REQUIRE_MESSAGE = (
    "the tensorrt target needs an NVIDIA GPU with TensorRT: install the gpu extra "
    "(pip install 'xmsearch[gpu]') on a GPU host, or use --target cpu / onnxruntime"
)
# Largest drop of a retrieval metric that a reduced-precision engine may cost.
MAX_RETRIEVAL_DROP = 0.01
GATED_METRICS = ("recall@10", "ndcg@10")


@dataclass(frozen=True)
class TritonRelease:
    """What one NGC ``tritonserver:<tag>-py3`` image contains (NGC release notes)."""

    tag: str
    server: str
    tensorrt: str
    cuda: str


# NGC image tag -> server version and the TensorRT its ``tensorrt`` backend links.  A plan
# must be built by that same TensorRT version to load in that image.
TRITON_RELEASES: dict[str, TritonRelease] = {
    r.tag: r for r in (
        TritonRelease("24.10", "2.51.0", "10.5.0", "12.6.2"),
    )
}
# The release deploy/Dockerfile uses: the same server (2.51.0) as the CPU test server that
# the nvidia-pytriton 0.7.0 wheel bundles.
TRITON_IMAGE_TAG = "24.10"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_IMAGE_TAG}-py3"


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile: input name -> (min, opt, max) shapes, batch first."""

    shapes: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (lo, opt, hi) in self.shapes.items():
            if not len(lo) == len(opt) == len(hi):
                raise ConfigError(f"profile input {name!r}: min {lo}, opt {opt}, max {hi} "
                                  "differ in rank; give one size per dimension")
            if any(d < 1 for d in (*lo, *opt, *hi)):
                raise ConfigError(f"profile input {name!r}: min {lo}, opt {opt}, max {hi} "
                                  "must be positive sizes (a profile has no -1)")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ConfigError(f"profile input {name!r}: need min <= opt <= max per "
                                  f"dimension, got min {lo}, opt {opt}, max {hi}")

    def min(self, name: str) -> Shape:
        return self.shapes[name][0]

    def opt(self, name: str) -> Shape:
        return self.shapes[name][1]

    def max(self, name: str) -> Shape:
        return self.shapes[name][2]

    @property
    def batch_range(self) -> tuple[int, int, int]:
        """(min, opt, max) batch size; every input shares it."""
        first = next(iter(self.shapes.values()))
        return first[0][0], first[1][0], first[2][0]

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {n: {"min": list(a), "opt": list(b), "max": list(c)}
                for n, (a, b, c) in self.shapes.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, Sequence[int]]]) -> Profile:
        return cls({n: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                    for n, v in data.items()})


def profiles_for(spec: ModelSpec) -> Profile:
    """The optimisation profile a model spec asks for.

    Batch: min 1, opt the largest preferred batch size (what the dynamic batcher forms
    under load; ``max_batch_size`` when none is preferred), max ``max_batch_size``.  Each
    dynamic non-batch axis takes ``spec.min_axis`` / ``opt_axis`` / ``max_axis`` by axis
    name; ``max_axis`` is required, min defaults to 1 and opt to the max.
    """
    if spec.max_batch_size < 1:
        raise ConfigError(f"{spec.name}: max_batch_size {spec.max_batch_size} gives no "
                          "batch dimension; a TensorRT profile needs max_batch_size >= 1")
    bad = [b for b in spec.preferred_batch_sizes if not 1 <= b <= spec.max_batch_size]
    if bad:
        raise ConfigError(f"{spec.name}: preferred batch sizes {bad} are outside "
                          f"1..max_batch_size ({spec.max_batch_size}); fix the spec")
    opt_batch = max(spec.preferred_batch_sizes, default=spec.max_batch_size)
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for t in spec.inputs:
        if t.dtype == "object":
            raise ConfigError(f"{spec.name}: input {t.name!r} is BYTES; TensorRT engines take "
                              "numeric tensors only (keep this model on the python backend)")
        dynamic = [d for d in t.dims if d == -1]
        if len(t.axis_names) != len(dynamic):
            raise ConfigError(f"{spec.name}.{t.name}: {len(dynamic)} dynamic dims but axis "
                              f"names {t.axis_names}; name every -1 dimension once")
        names = iter(t.axis_names)
        lo, opt, hi = [1], [opt_batch], [spec.max_batch_size]
        for d in t.dims:
            if d == -1:
                axis = next(names)
                if axis not in spec.max_axis:
                    raise ConfigError(f"{spec.name}.{t.name}: dynamic axis {axis!r} has no "
                                      f"max_axis entry; add max_axis={{{axis!r}: N}} to the spec")
                top = spec.max_axis[axis]
                sizes = (spec.min_axis.get(axis, 1), spec.opt_axis.get(axis, top), top)
            else:
                sizes = (d, d, d)
            for dims, size in zip((lo, opt, hi), sizes):
                dims.append(size)
        shapes[t.name] = (tuple(lo), tuple(opt), tuple(hi))
    try:
        return Profile(shapes)
    except ConfigError as e:
        raise ConfigError(f"{spec.name}: {e}") from e


def profile_problems(profile: Profile, input_shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """What keeps ``profile`` from fitting a network whose inputs have ``input_shapes``.

    ``input_shapes`` gives each network input's shape with -1 for a dynamic dimension (as
    TensorRT's parsed network or the ONNX graph declares it).  Empty when it fits.
    """
    problems = []
    missing = sorted(set(input_shapes) - set(profile.shapes))
    extra = sorted(set(profile.shapes) - set(input_shapes))
    if missing:
        problems.append(f"network inputs {missing} have no profile shapes")
    if extra:
        problems.append(f"profile names {extra} that the network does not have "
                        f"(its inputs: {sorted(input_shapes)})")
    for name in sorted(set(input_shapes) & set(profile.shapes)):
        declared = tuple(int(d) for d in input_shapes[name])
        for label, shape in zip(("min", "opt", "max"), profile.shapes[name]):
            if len(shape) != len(declared):
                problems.append(f"{name}: {label} shape {shape} has rank {len(shape)}, the "
                                f"network declares {declared}")
                break
            fixed = [i for i, d in enumerate(declared) if d >= 0 and shape[i] != d]
            if fixed:
                problems.append(f"{name}: {label} shape {shape} differs from the network's "
                                f"fixed dims {declared} at axis {fixed}")
                break
    return problems


def onnx_input_shapes(onnx_path: str | os.PathLike[str]) -> dict[str, Shape]:
    """Graph inputs of an ONNX file (initializers excluded), -1 for symbolic dims."""
    import onnx

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError/OSError variants
        raise ModelError(f"cannot read ONNX graph {path}: {e}; re-run the ONNX export") from e
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    return shapes


def check_profile_against_onnx(profile: Profile, onnx_path: str | os.PathLike[str]) -> None:
    """Raise ModelError when ``profile`` does not fit the ONNX graph's inputs (CPU only)."""
    problems = profile_problems(profile, onnx_input_shapes(onnx_path))
    if problems:
        raise ModelError(f"optimisation profile does not fit {onnx_path}: " + "; ".join(problems)
                         + "; the spec and the exported graph disagree, re-export the model")


# --------------------------------------------------------------------------- sidecar


@dataclass(frozen=True)
class EngineInfo:
    """What built a plan: written as ``<plan>.json`` next to it."""

    plan_path: str
    precision: str
    profile: Profile
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_path: str
    onnx_sha256: str
    plan_bytes: int = 0
    build_seconds: float = 0.0
    workspace_gib: float = 0.0
    timing_cache: str | None = None
    timing_cache_loaded_bytes: int = 0
    calibration_cache: str | None = None
    calibration_batches_fed: int = 0
    built_at: str = ""

    @property
    def sidecar_path(self) -> Path:
        return sidecar_path(self.plan_path)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SIDECAR_FORMAT,
            "plan_path": self.plan_path,
            "precision": self.precision,
            "profile": self.profile.to_json(),
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "onnx_path": self.onnx_path,
            "onnx_sha256": self.onnx_sha256,
            "plan_bytes": self.plan_bytes,
            "build_seconds": self.build_seconds,
            "workspace_gib": self.workspace_gib,
            "timing_cache": self.timing_cache,
            "timing_cache_loaded_bytes": self.timing_cache_loaded_bytes,
            "calibration_cache": self.calibration_cache,
            "calibration_batches_fed": self.calibration_batches_fed,
            "built_at": self.built_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineInfo:
        if data.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"sidecar format {data.get('format')!r}, expected {SIDECAR_FORMAT}")
        kwargs = {k: v for k, v in data.items() if k not in ("format", "profile")}
        return cls(profile=Profile.from_json(data["profile"]), **kwargs)


def sidecar_path(plan_path: str | os.PathLike[str]) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    return Path(str(plan_path) + SIDECAR_SUFFIX)


def write_engine_info(info: EngineInfo) -> Path:
    """Write the sidecar atomically (temp file, fsync, rename) and return its path."""
    path = info.sidecar_path
    _write_atomic(path, (json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n").encode())
    return path


def read_engine_info(plan_path: str | os.PathLike[str]) -> EngineInfo:
    """Read a plan's sidecar; a missing, truncated or foreign file is a ModelError."""
    path = sidecar_path(plan_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: the plan {plan_path} has no record of the "
                         f"TensorRT version and GPU that built it; {REBUILD_HINT}") from None
    except OSError as e:
        raise ModelError(f"cannot read engine sidecar {path}: {e}") from e
    try:
        return EngineInfo.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"engine sidecar {path} is corrupt or truncated ({e}); {REBUILD_HINT}") from e


def _write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (encoder graphs are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- compatibility


@dataclass(frozen=True)
class HostEnvironment:
    """The TensorRT version and GPU a plan is about to run on."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def _version_key(version: str) -> tuple[int, ...]:
    # "10.5.0.18" (container libnvinfer) and "10.5.0" (pip wheel) are one release: the
    # serialisation tag follows major.minor.patch.
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def compat_problems(built: EngineInfo | HostEnvironment, host: HostEnvironment,
                    allow_other_gpu_model: bool = False) -> list[str]:
    """Why a plan built in ``built`` cannot (or should not) run on ``host``; empty if fine.

    TensorRT version (major.minor.patch) and compute capability must match: TensorRT
    refuses a plan from another version and its kernels are compiled per SM.  Another GPU
    model of the same capability loads but runs tactics timed on the other card; that is
    refused too unless ``allow_other_gpu_model``.
    """
    problems = []
    if _version_key(built.tensorrt_version) != _version_key(host.tensorrt_version):
        problems.append(f"TensorRT {built.tensorrt_version} != {host.tensorrt_version}")
    if built.compute_capability != host.compute_capability:
        problems.append(f"compute capability {built.compute_capability} != {host.compute_capability}")
    elif built.gpu_name.strip() != host.gpu_name.strip() and not allow_other_gpu_model:
        problems.append(f"GPU model {built.gpu_name!r} != {host.gpu_name!r}")
    return problems


def compat_message(plan_path: str | os.PathLike[str], built: EngineInfo | HostEnvironment,
                   host: HostEnvironment, problems: Sequence[str]) -> str:
    """The one-line refusal shown when :func:`compat_problems` is not empty."""
    return (f"{plan_path}: engine built with TensorRT {built.tensorrt_version} on GPU "
            f"{built.gpu_name} (compute {built.compute_capability}), this host has TensorRT "
            f"{host.tensorrt_version} on GPU {host.gpu_name} (compute "
            f"{host.compute_capability}) [{'; '.join(problems)}]: {REBUILD_HINT}")


def host_environment() -> HostEnvironment:
    """TensorRT version and current CUDA GPU of this process (needs both)."""
    trt = require_tensorrt()
    name, capability = _current_gpu()
    return HostEnvironment(trt.__version__, name, capability)


def check_engine_compat(plan_path: str | os.PathLike[str], host: HostEnvironment | None = None,
                        allow_other_gpu_model: bool = False) -> EngineInfo:
    """Refuse a plan whose sidecar names another TensorRT version or GPU than ``host``.

    ``host`` defaults to this machine (:func:`host_environment`); pass the serving host's
    values to check a plan for a machine other than the one running this code.
    """
    info = read_engine_info(plan_path)
    host = host if host is not None else host_environment()
    problems = compat_problems(info, host, allow_other_gpu_model)
    if problems:
        raise ModelError(compat_message(plan_path, info, host, problems))
    if info.gpu_name.strip() != host.gpu_name.strip():
        log.warning("%s was built on %s and runs on %s (same compute capability %s): "
                    "tactics were timed on the other card", plan_path, info.gpu_name,
                    host.gpu_name, host.compute_capability)
    return info


def serving_tensorrt_problems(tensorrt_version: str, image_tag: str = TRITON_IMAGE_TAG) -> list[str]:
    """Whether a plan built by ``tensorrt_version`` loads in the NGC image ``image_tag``."""
    release = TRITON_RELEASES.get(image_tag)
    if release is None:
        return [f"unknown Triton image tag {image_tag!r}; known: {sorted(TRITON_RELEASES)}"]
    if _version_key(tensorrt_version) != _version_key(release.tensorrt):
        return [f"TensorRT {tensorrt_version} builds plans that tritonserver:{image_tag}-py3 "
                f"(TensorRT {release.tensorrt}) cannot load; install "
                f"tensorrt-cu12=={release.tensorrt} to build for that image"]
    return []


# --------------------------------------------------------------------------- gates


def gate_on_retrieval(fp32_metrics: Mapping[str, float], reduced_metrics: Mapping[str, float],
                      precision: str = "fp16", max_drop: float = MAX_RETRIEVAL_DROP,
                      metrics: Sequence[str] = GATED_METRICS) -> dict[str, float]:
    """Refuse a reduced-precision engine that costs retrieval quality.

    Returns the drop (FP32 minus reduced) of each gated metric; raises ModelError when any
    drops by more than ``max_drop`` (absolute, e.g. 0.01 = one point of Recall@10).
    """
    missing = [m for m in metrics if m not in fp32_metrics or m not in reduced_metrics]
    if missing:
        raise InputError(f"retrieval gate needs {list(metrics)} for both fp32 and {precision}; "
                         f"missing {missing} (fp32 has {sorted(fp32_metrics)}, {precision} has "
                         f"{sorted(reduced_metrics)})")
    drops = {m: float(fp32_metrics[m]) - float(reduced_metrics[m]) for m in metrics}
    # 1e-9 absorbs float subtraction noise so that a drop of exactly max_drop passes.
    failed = {m: d for m, d in drops.items() if not d <= max_drop + 1e-9}
    if failed:
        detail = ", ".join(f"{m} {float(fp32_metrics[m]):.4f} -> {float(reduced_metrics[m]):.4f} "
                           f"(-{d:.4f})" for m, d in failed.items())
        raise ModelError(f"{precision} engine loses retrieval quality beyond {max_drop:.2f}: "
                         f"{detail}; keep fp32 for this model or calibrate on more "
                         "representative data")
    return drops


def compare_outputs(reference: Mapping[str, np.ndarray],
                    candidate: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per-output max absolute difference and minimum per-row cosine (pure numpy).

    Rows are the batch dimension, each flattened over the rest.  A missing output or a
    shape mismatch is reported with cosine 0 so that it fails any threshold.
    """
    report: dict[str, dict[str, Any]] = {}
    for name, ref in reference.items():
        r = np.asarray(ref, dtype=np.float64)
        if name not in candidate:
            report[name] = {"max_abs_diff": float("inf"), "min_cosine": 0.0, "shape": r.shape,
                            "problem": "missing from the engine's outputs"}
            continue
        c = np.asarray(candidate[name], dtype=np.float64)
        if r.shape != c.shape:
            report[name] = {"max_abs_diff": float("inf"), "min_cosine": 0.0, "shape": c.shape,
                            "problem": f"shape {c.shape} != reference {r.shape}"}
            continue
        if r.size == 0:
            report[name] = {"max_abs_diff": 0.0, "min_cosine": 1.0, "shape": r.shape}
            continue
        rows_r = r.reshape(r.shape[0], -1) if r.ndim > 1 else r.reshape(1, -1)
        rows_c = c.reshape(rows_r.shape)
        nr, nc = np.linalg.norm(rows_r, axis=1), np.linalg.norm(rows_c, axis=1)
        dots = np.sum(rows_r * rows_c, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where((nr == 0) & (nc == 0), 1.0, dots / (nr * nc))
        # NaN (an engine producing NaN) must fail, so min over NaN stays NaN.
        report[name] = {"max_abs_diff": float(np.max(np.abs(r - c))),
                        "min_cosine": float(np.min(cos)), "shape": r.shape}
    return report


def assert_parity(report: Mapping[str, Mapping[str, Any]], min_cosine: float,
                  what: str = "TensorRT vs ONNX Runtime") -> None:
    """Raise ModelError listing every output's figures when one is below ``min_cosine``."""
    bad = [n for n, r in report.items() if not r["min_cosine"] >= min_cosine]
    if bad:
        figures = "; ".join(
            f"{n}: max |diff| {r['max_abs_diff']:.3e}, min cosine {r['min_cosine']:.6f}"
            + (f" ({r['problem']})" if r.get("problem") else "")
            for n, r in report.items())
        raise ModelError(f"{what} parity below cosine {min_cosine} for {bad}: {figures}; "
                         "build at higher precision (--precision fp32) or check the export")


# --------------------------------------------------------------------------- TensorRT


def require_tensorrt():
    """Import and return the ``tensorrt`` module, or raise ModelError saying how to get it.

    Both TensorRT and a CUDA GPU are required: TensorRT builds and runs plans only on a GPU.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: wheel present, CUDA libraries missing
        raise ModelError(f"{REQUIRE_MESSAGE} (import tensorrt failed: {e})") from e
    try:
        import torch

        has_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception as e:  # a broken driver raises from inside torch
        raise ModelError(f"{REQUIRE_MESSAGE} (no usable CUDA device: {e})") from e
    if not has_gpu:
        raise ModelError(f"{REQUIRE_MESSAGE} (TensorRT {trt.__version__} is installed but "
                         "no CUDA GPU is visible)")
    return trt


def _current_gpu() -> tuple[str, str]:
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def _trt_major(trt) -> int:
    return _version_key(trt.__version__)[0]


def _make_logger(trt):
    """A TensorRT logger that forwards to ``logging`` and remembers errors for the raise."""
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR,
              sev.WARNING: logging.WARNING, sev.INFO: logging.INFO, sev.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(str(msg))
            # TensorRT's INFO is a flood of tactic lines: keep it at DEBUG.
            log.log(logging.DEBUG if level == logging.INFO else level, "TensorRT: %s", msg)

    return _Logger()


def _calibration_shapes(batches: Sequence[Mapping[str, np.ndarray]],
                        input_names: Sequence[str]) -> dict[str, Shape]:
    """The one shape per input that every calibration batch must share."""
    if not batches:
        raise InputError("int8 calibration got an empty list of batches; pass "
                         "calibration_batches or an existing calibration_cache")
    shapes: dict[str, Shape] = {}
    for i, batch in enumerate(batches):
        names = set(batch)
        if names != set(input_names):
            raise InputError(f"calibration batch {i} has inputs {sorted(names)}, the network "
                             f"takes {sorted(input_names)}")
        for name in input_names:
            shape = tuple(np.shape(batch[name]))
            if shapes.setdefault(name, shape) != shape:
                raise InputError(f"calibration batch {i}: {name} shape {shape} != {shapes[name]} "
                                 "of batch 0; TensorRT calibrates at one shape, pad or crop "
                                 "every batch to it")
    return shapes


def _normalise_batches(batches: Iterable[Mapping[str, np.ndarray] | np.ndarray],
                       input_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    out = []
    for b in batches:
        if isinstance(b, np.ndarray):
            if len(input_names) != 1:
                raise InputError(f"a bare array calibration batch needs a one-input network; "
                                 f"this one takes {list(input_names)}: pass dicts name -> array")
            b = {input_names[0]: b}
        out.append(dict(b))
    return out


def _make_calibrator(trt, batches: list[dict[str, np.ndarray]], cache: Path | None):
    """IInt8EntropyCalibrator2 fed from host batches, with a calibration cache file."""
    import torch

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._pending = iter(batches)
            self._device: list[torch.Tensor] = []  # kept alive while TensorRT reads them
            self.fed = 0
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            # Ignored for explicit-batch networks (TensorRT >= 10); the batch is in the shape.
            return int(next(iter(batches[0].values())).shape[0]) if batches else 1

        def get_batch(self, names, *_):
            # An exception must not cross into TensorRT's C++ caller: keep it for the raise.
            try:
                batch = next(self._pending, None)
                if batch is None:
                    return None
                self._device = [torch.from_numpy(np.ascontiguousarray(batch[n])).cuda()
                                for n in names]
                torch.cuda.synchronize()
                self.fed += 1
                return [int(t.data_ptr()) for t in self._device]
            except BaseException as e:  # noqa: BLE001 - re-raised after the build
                self.error = e
                return None

        def read_calibration_cache(self, *_):
            if cache is not None and cache.is_file() and cache.stat().st_size > 0:
                log.info("INT8 calibration: reusing cache %s", cache)
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data) -> None:
            if cache is None:
                return
            try:
                _write_atomic(cache, bytes(data))
                log.info("INT8 calibration: wrote cache %s", cache)
            except BaseException as e:  # noqa: BLE001
                self.error = e

    return _Calibrator()


def calibration_shape_problems(profile: Profile, shapes: Mapping[str, Shape]) -> list[str]:
    """Inputs whose calibration shape is not the profile's opt shape (TensorRT 10 rule)."""
    return [f"{n} calibration shape {tuple(s)} != opt {profile.opt(n)}"
            for n, s in shapes.items() if tuple(s) != profile.opt(n)]


def _set_calibration_shapes(trt, builder, config, profile: Profile,
                            shapes: Mapping[str, Shape], logger) -> None:
    """Make TensorRT calibrate at the shapes of the calibration batches.

    TensorRT 10 calibrates at the opt shapes of the first optimisation profile (its
    calibration-profile call is deprecated and known to fail internally there), so the
    batches must have exactly those shapes; 8.x takes an explicit calibration profile.
    """
    if _trt_major(trt) >= 10:
        problems = calibration_shape_problems(profile, shapes)
        if problems:
            raise InputError(f"TensorRT {trt.__version__} calibrates at the optimisation "
                             f"profile's opt shapes: {'; '.join(problems)}; batch and pad the "
                             "calibration data to those shapes")
        return
    calib_profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        calib_profile.set_shape(name, shape, shape, shape)
    if not config.set_calibration_profile(calib_profile):
        raise ModelError(f"TensorRT rejected the calibration shapes {dict(shapes)}: "
                         + " | ".join(logger.errors or ["no detail"]))


def _load_timing_cache(config, path: Path | None) -> tuple[Any, int]:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
        accepted = cache is not None and config.set_timing_cache(cache, False)
    except Exception as e:  # a truncated file can raise from the deserialiser
        log.debug("timing cache %s unreadable: %s", path, e)
        accepted = False
    if not accepted:
        # A cache from another TensorRT version or GPU is refused: start a fresh one
        # rather than fail the build, and overwrite the file afterwards.
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", path)
        data = b""
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache, len(data)


def build_engine(onnx_path: str | os.PathLike[str], plan_path: str | os.PathLike[str],
                 profile: Profile, precision: str = "fp16",
                 calibration_batches: Sequence[Mapping[str, np.ndarray] | np.ndarray] | None = None,
                 calibration_cache: str | os.PathLike[str] | None = None,
                 timing_cache: str | os.PathLike[str] | None = None,
                 workspace_gib: float = 4) -> EngineInfo:
    """Build a serialized TensorRT engine from an ONNX graph and write ``plan_path``.

    ``profile`` is the single optimisation profile (see :func:`profiles_for`).
    ``precision``: "fp32", "fp16" (default) or "int8"; int8 also enables fp16 for layers
    without int8 kernels and needs ``calibration_batches`` (dicts input -> array, or bare
    arrays for a one-input network; on TensorRT 10 each batch has the profile's opt
    shapes) or an existing ``calibration_cache``; the cache is written after calibration
    and, when present, used instead of calibrating again.
    ``timing_cache`` is loaded when it exists and saved after the build, so that builds of
    several models (and rebuilds) share kernel timings.  Writes ``<plan>.json``.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not one of {PRECISIONS}")
    if workspace_gib <= 0:
        raise InputError(f"workspace_gib {workspace_gib} must be positive")
    calib_cache = Path(calibration_cache) if calibration_cache is not None else None
    has_batches = calibration_batches is not None and len(calibration_batches) > 0
    if precision == "int8" and not has_batches and not (calib_cache and calib_cache.is_file()):
        raise InputError("int8 needs calibration data: pass calibration_batches (a few hundred "
                         "representative inputs) or an existing calibration_cache file")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise ModelError(f"ONNX graph {onnx_path} not found; run the ONNX export first")
    trt = require_tensorrt()
    t0 = time.perf_counter()

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit batch; 8.x needs the flag.
    flags = 0 if _trt_major(trt) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external-data tensors next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for err in errors:
            log.error("ONNX parser: %s", err)
        raise ModelError(f"TensorRT could not parse {onnx_path} ({len(errors)} errors): "
                         + " | ".join(errors or logger.errors or ["no detail"])
                         + "; check the opset and unsupported ops, or use --target onnxruntime")

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    declared = {t.name: tuple(t.shape) for t in inputs}
    problems = profile_problems(profile, declared)
    if problems:
        raise ModelError(f"optimisation profile does not fit {onnx_path}: " + "; ".join(problems))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision in ("fp16", "int8"):
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise ModelError(f"TensorRT {trt.__version__} has no weakly typed fp16/int8 builds; "
                             f"install tensorrt-cu12=={TRITON_RELEASES[TRITON_IMAGE_TAG].tensorrt} "
                             f"(the version in {TRITON_IMAGE}) or build with --precision fp32")
        config.set_flag(trt.BuilderFlag.FP16)

    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        trt_profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(trt_profile) < 0:
        raise ModelError(f"TensorRT rejected the optimisation profile {profile.to_json()} for "
                         f"{onnx_path}: " + " | ".join(logger.errors or ["no detail"]))

    calibrator = None
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        names = [t.name for t in inputs]
        batches = _normalise_batches(calibration_batches if has_batches else [], names)
        if batches:
            shapes = _calibration_shapes(batches, names)
            _set_calibration_shapes(trt, builder, config, profile, shapes, logger)
            # Cast once here so that get_batch hands TensorRT exactly its input dtypes.
            dtypes = {t.name: np.dtype(trt.nptype(t.dtype)) for t in inputs}
            batches = [{n: np.asarray(b[n]).astype(dtypes[n], copy=False) for n in names}
                       for b in batches]
        calibrator = _make_calibrator(trt, batches, calib_cache)
        config.int8_calibrator = calibrator

    cache_path = Path(timing_cache) if timing_cache is not None else None
    _, loaded = _load_timing_cache(config, cache_path)

    log.info("building %s engine from %s (profile %s)", precision, onnx_path, profile.to_json())
    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None and calibrator.error is not None:
        raise ModelError(f"INT8 calibration failed: {calibrator.error}") from calibrator.error
    if serialized is None:
        raise ModelError(f"TensorRT failed to build a {precision} engine from {onnx_path}: "
                         + " | ".join(logger.errors or ["no error was logged"])
                         + f"; try a larger workspace (now {workspace_gib} GiB) or --precision fp32")

    plan = bytes(serialized)
    _write_atomic(plan_path, plan)
    if cache_path is not None:
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))

    gpu_name, capability = _current_gpu()
    info = EngineInfo(
        plan_path=str(plan_path), precision=precision, profile=profile,
        tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
        onnx_path=str(onnx_path), onnx_sha256=file_sha256(onnx_path), plan_bytes=len(plan),
        build_seconds=round(time.perf_counter() - t0, 3), workspace_gib=float(workspace_gib),
        timing_cache=str(cache_path) if cache_path else None, timing_cache_loaded_bytes=loaded,
        calibration_cache=str(calib_cache) if calib_cache else None,
        calibration_batches_fed=calibrator.fed if calibrator is not None else 0,
        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    write_engine_info(info)
    for problem in serving_tensorrt_problems(trt.__version__):
        log.warning("%s: %s", plan_path, problem)
    log.info("wrote %s (%d bytes, %.1f s)", plan_path, len(plan), info.build_seconds)
    return info


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def run_engine(plan_path: str | os.PathLike[str], feeds: Mapping[str, np.ndarray],
               check_compat: bool = True) -> dict[str, np.ndarray]:
    """Run a plan once on host arrays and return its outputs as host arrays.

    For checks and tests (Triton serves the plans in production).  Buffers are torch CUDA
    tensors; shapes outside the plan's profile raise InputError.
    """
    trt = require_tensorrt()
    import torch

    plan_path = Path(plan_path)
    if check_compat:
        check_engine_compat(plan_path)
    logger = _make_logger(trt)
    runtime = trt.Runtime(logger)
    try:
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    except OSError as e:
        raise ModelError(f"cannot read plan {plan_path}: {e}") from e
    if engine is None:
        raise ModelError(f"TensorRT could not load {plan_path}: "
                         + " | ".join(logger.errors or ["no detail"]) + f"; {REBUILD_HINT}")
    context = engine.create_execution_context()
    if context is None:
        raise ModelError(f"no execution context for {plan_path} (out of GPU memory?): "
                         + " | ".join(logger.errors or ["no detail"]))

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    in_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    out_names = [n for n in names if n not in in_names]
    missing, extra = sorted(set(in_names) - set(feeds)), sorted(set(feeds) - set(in_names))
    if missing or extra:
        raise InputError(f"{plan_path} takes inputs {in_names}; missing {missing}, unexpected {extra}")

    stream = torch.cuda.Stream()
    buffers: dict[str, torch.Tensor] = {}
    with torch.cuda.stream(stream):
        for name in in_names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            host = np.ascontiguousarray(np.asarray(feeds[name]).astype(dtype, copy=False))
            if not context.set_input_shape(name, host.shape):
                lo, _, hi = engine.get_tensor_profile_shape(name, 0)
                raise InputError(f"{name} shape {host.shape} is outside the profile of "
                                 f"{plan_path} (min {tuple(lo)}, max {tuple(hi)})")
            buffers[name] = torch.from_numpy(host).to("cuda", non_blocking=False)
        for name in out_names:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(f"{plan_path}: output {name} has data-dependent shape {shape}")
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            buffers[name] = torch.empty(shape, dtype=_torch_dtype(dtype), device="cuda")
        for name, tensor in buffers.items():
            if not context.set_tensor_address(name, int(tensor.data_ptr())):
                raise ModelError(f"{plan_path}: TensorRT refused the buffer for {name}")
    # Inputs were copied on `stream`, so the engine sees them without an extra sync.
    if not context.execute_async_v3(stream.cuda_stream):
        raise ModelError(f"{plan_path}: execution failed: " + " | ".join(logger.errors or ["no detail"]))
    stream.synchronize()
    return {name: buffers[name].cpu().numpy() for name in out_names}


def check_engine_parity(plan_path: str | os.PathLike[str], onnx_path: str | os.PathLike[str],
                        feeds: Mapping[str, np.ndarray], min_cosine: float = 0.999) -> dict[str, dict[str, Any]]:
    """Compare a plan with ONNX Runtime (CPU) on ``feeds``; raise below ``min_cosine``.

    Returns per output ``max_abs_diff`` and ``min_cosine`` (per row over the batch).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    reference = dict(zip(names, session.run(names, {k: np.asarray(v) for k, v in feeds.items()})))
    report = compare_outputs(reference, run_engine(plan_path, feeds))
    assert_parity(report, min_cosine, what=f"TensorRT {plan_path} vs ONNX Runtime {onnx_path}")
    return report


__all__ = [
    "EngineInfo", "HostEnvironment", "Profile", "TritonRelease", "TRITON_IMAGE", "TRITON_IMAGE_TAG",
    "TRITON_RELEASES", "assert_parity", "build_engine", "calibration_shape_problems", "check_engine_compat",
    "check_engine_parity", "check_profile_against_onnx", "compare_outputs", "compat_message",
    "compat_problems", "file_sha256", "gate_on_retrieval", "host_environment",
    "onnx_input_shapes", "profile_problems", "profiles_for", "read_engine_info",
    "require_tensorrt", "run_engine", "serving_tensorrt_problems", "sidecar_path",
    "write_engine_info",
]
