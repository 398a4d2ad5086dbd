"""What a self-contained benchmark run stands on: a demo catalogue, an exported cpu-target
model repository and a private tritonserver on free ports.

The catalogue and the repository are cached under ``benchmarks/.cache/`` (git-ignored):
a second run reuses them.  A repository is reused only when its cache key matches: the
text model, the fusion weights (the checkpoint's SHA-256, or "untrained") and the source
of every module the export writes from, so a changed exporter never serves stale graphs.
Serving *speed* does not depend on the fusion weights; untrained weights are fine for
measuring it and the report says which were used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xmsearch import spec
from xmsearch.errors import ConfigError

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"

# Files whose content decides what an export writes: any change invalidates cached repositories.
_EXPORT_SOURCES = ("export/pipeline.py", "export/onnx.py", "export/quantize.py", "export/repository.py",
                   "xmsearch/spec.py", "xmsearch/onnxrt.py",
                   "xmsearch/triton_models.py", "xmsearch/preprocess.py", "xmsearch/models/text.py",
                   "xmsearch/models/image.py", "xmsearch/models/fusion.py")


@dataclass(frozen=True)
class Catalogue:
    """A demo catalogue on disk: ``catalog.jsonl``, ``queries.jsonl`` and their images."""

    root: Path
    n_items: int
    n_queries: int

    @property
    def catalog_file(self) -> Path:
        return self.root / "catalog.jsonl"

    @property
    def queries_file(self) -> Path:
        return self.root / "queries.jsonl"


def demo_catalogue(n_items: int, n_queries: int, cache_dir: Path = CACHE_DIR, seed: int = 0) -> Catalogue:
    """The seeded demo catalogue of ``n_items`` products, generated once and cached."""
    from xmsearch.demo import generate_demo_catalog

    root = Path(cache_dir) / f"catalog-n{n_items}-q{n_queries}-s{seed}"
    stamp = root / "bench-stamp.json"
    params = {"n": n_items, "queries": n_queries, "seed": seed}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        log.info("benchmarks: generating demo catalogue in %s", root)
        generate_demo_catalog(root, n=n_items, seed=seed, n_queries=n_queries)
        stamp.write_text(json.dumps(params))  # written last: its presence means "complete"
    return Catalogue(root, n_items, n_queries)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def repository_key(text_model: str, fusion: Path | None, text_precision: str = "auto",
                   fusion_precision: str = "auto") -> dict[str, str]:
    """What a cached repository must have been exported from to be reused."""
    sources = hashlib.sha256()
    for rel in _EXPORT_SOURCES:
        path = REPO / rel
        if path.is_file():
            sources.update(rel.encode())
            sources.update(path.read_bytes())
    return {"text_model": text_model, "fusion": _sha256(Path(fusion)) if fusion else "untrained",
            "target": "cpu", "text_precision": text_precision, "fusion_precision": fusion_precision,
            "sources": sources.hexdigest()[:16]}


@dataclass(frozen=True)
class Repository:
    """An exported cpu-target model repository."""

    path: Path
    text_model: str
    trained: bool
    fingerprint: str

    def member_file(self, member: str, name: str = "model.onnx") -> Path:
        return self.path / member / "1" / name


def exported_repository(text_model: str = spec.DEFAULT_TEXT_MODEL, fusion: Path | None = None,
                        cache_dir: Path = CACHE_DIR, step: Callable[[str], None] = lambda m: None,
                        text_precision: str = "auto", fusion_precision: str = "auto") -> Repository:
    """A cpu-target repository for ``text_model`` with ``fusion`` weights (None: untrained),
    the text encoder in ``text_precision`` and the fusion graphs in ``fusion_precision``
    (``xmsearch export --text-precision / --fusion-precision``), cached."""
    from xmsearch.export.pipeline import export_repository

    if fusion is not None and not Path(fusion).is_file():
        raise ConfigError(f"benchmarks: --fusion {fusion} does not exist; pass a checkpoint from "
                          "`xmsearch train` or leave --fusion out to measure with untrained weights")
    key = repository_key(text_model, fusion, text_precision, fusion_precision)
    suffix = "".join(f"-{what}-{p}" for what, p in (("text", text_precision), ("fusion", fusion_precision))
                     if p != "auto")
    path = Path(cache_dir) / f"repository-{text_model}{suffix}"
    key_file = path / "bench-key.json"
    meta_file = path / "xmsearch_export.json"
    if key_file.is_file() and meta_file.is_file() and json.loads(key_file.read_text()) == key:
        meta = json.loads(meta_file.read_text())
        return Repository(path, text_model, bool(meta.get("trained")), meta["fingerprint"])
    if path.exists():
        shutil.rmtree(path)
    step(f"exporting a cpu repository for {text_model} into {path}")
    result = export_repository(path, target="cpu", fusion_checkpoint=fusion, untrained=fusion is None,
                               text_model=text_model, text_precision=text_precision,
                               fusion_precision=fusion_precision, step=step)
    key_file.write_text(json.dumps(key))
    return Repository(path, text_model, result.trained, result.fingerprint)


def toy_io(cls, name: str, dtype: str = "TYPE_FP32", dims: tuple[int, ...] = (-1,)):
    """A ``ModelInput`` / ``ModelOutput`` (``cls``) of a toy repository's member or ensemble."""
    from tritonclient.grpc import model_config_pb2 as mc

    return cls(name=name, data_type=getattr(mc, dtype), dims=list(dims))


def toy_member(root: Path, name: str, source: str, inputs: list, outputs: list) -> None:
    """Write a one-instance python-backend member with dynamic batching (``source`` is its
    model.py): the do-nothing steps of ``stub_floor`` and ``member_traffic``."""
    from tritonclient.grpc import model_config_pb2 as mc

    from xmsearch.export.repository import write_config

    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=64)
    cfg.input.extend(inputs)
    cfg.output.extend(outputs)
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    cfg.dynamic_batching.SetInParent()
    write_config(cfg, root / name)
    (root / name / "1").mkdir(exist_ok=True)
    (root / name / "1" / "model.py").write_text(source)


def toy_chain(root: Path, name: str, steps: list[tuple[str, dict[str, str], dict[str, str]]],
              inputs: list, outputs: list) -> None:
    """Write an ensemble of ``steps``, each (member, input_map, output_map)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from xmsearch.export.repository import write_config

    cfg = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=64)
    cfg.input.extend(inputs)
    cfg.output.extend(outputs)
    for member, input_map, output_map in steps:
        step = cfg.ensemble_scheduling.step.add(model_name=member, model_version=-1)
        step.input_map.update(input_map)
        step.output_map.update(output_map)
    write_config(cfg, root / name)
    (root / name / "1").mkdir(exist_ok=True)


class PrivateServer:
    """A tritonserver on free ports serving ``repository``; a context manager that stops it."""

    def __init__(self, repository: Path, log_file: Path | None = None, ready_timeout: float = 300.0):
        from xmsearch.server import TritonServer, free_ports

        grpc_port, http_port, metrics_port = free_ports(3)
        self.server = TritonServer(repository, grpc_port, http_port, metrics_port, log_file=log_file,
                                   die_with_parent=True)
        self.ready_timeout = ready_timeout

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url

    def __enter__(self) -> "PrivateServer":
        self.server.start(timeout=self.ready_timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
