"""Served vs in-process ratios, the issue's targets, and the report sections for them.

Everything here is pure: it takes measured numbers (``LoadResult`` rows, perf_analyzer
sweeps, the ingest result) and returns tables and verdicts, so it is tested without a
server.  A target whose inputs were not measured in a run is reported as such, never as
met.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from benchmarks.loadgen import LoadResult
from benchmarks.perf_sweep import SweepResult
from benchmarks.report import ReportSection, markdown_table


@dataclass(frozen=True)
class Ratio:
    """``served / baseline`` for one comparison, and the issue's target for it."""

    name: str
    served: float | None
    baseline: float | None
    unit: str
    target: str  # e.g. ">= 3x"
    lower_is_better: bool = False  # latency comparisons: the ratio must stay *below* the bound
    bound: float = 1.0

    @property
    def value(self) -> float | None:
        if self.served is None or self.baseline is None or self.baseline <= 0:
            return None
        return self.served / self.baseline

    @property
    def met(self) -> bool | None:
        v = self.value
        if v is None:
            return None
        return v <= self.bound if self.lower_is_better else v >= self.bound

    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


def pick(results: Sequence[LoadResult], label: str, concurrency: int = 1, batch: int = 1) -> LoadResult | None:
    """The result with that label, concurrency and batch (None when absent)."""
    return next((r for r in results if r.label == label and r.concurrency == concurrency and r.batch == batch),
                None)


def best_batched(results: Sequence[LoadResult], label: str) -> LoadResult | None:
    """The highest-throughput batched (batch > 1) result with that label."""
    batched = [r for r in results if r.label == label and r.batch > 1]
    return max(batched, key=lambda r: r.qps) if batched else None


def sweep_row(sweeps: Sequence[SweepResult], model: str, concurrency: int):
    sweep = next((s for s in sweeps if s.model == model), None)
    return next((r for r in sweep.rows if r.concurrency == concurrency), None) if sweep else None


def best_throughput(sweeps: Sequence[SweepResult], model: str) -> float | None:
    sweep = next((s for s in sweeps if s.model == model), None)
    return max((r.throughput for r in sweep.rows), default=None) if sweep else None


def _qps(r: LoadResult | None) -> float | None:
    return r.qps if r else None


def ratios(served: Sequence[LoadResult], torch: Sequence[LoadResult], onnx: Sequence[LoadResult],
           sweeps: Sequence[SweepResult], ingest_items_per_s: float | None,
           text_alternated: tuple[float, float, int] | None = None) -> list[Ratio]:
    """The comparisons of issue #6, in the order the report lists them.  ``text_alternated``
    (served and baseline queries/s, rounds: ``benchmarks.text_ratio`` medians) adds the text
    comparison measured in alternated rounds after the sequential one."""
    text16, image16 = pick(served, "text", 16), pick(served, "image", 16)
    alternated = []
    if text_alternated:
        served_qps, base_qps, rounds = text_alternated
        alternated.append(Ratio(f"text queries, client c=16 vs ONNX Runtime best batch, alternated ({rounds} round"
                                f"{'s' if rounds != 1 else ''})", served_qps, base_qps, "queries/s", ">= 0.8x",
                                bound=0.8))
    out = [
        Ratio("text queries, client c=16 vs PyTorch one query at a time", _qps(text16),
              _qps(pick(torch, "text")), "queries/s", ">= 3x", bound=3.0),
        Ratio("text queries, client c=16 vs ONNX Runtime best batch", _qps(text16),
              _qps(best_batched(onnx, "text")), "queries/s", ">= 0.8x", bound=0.8),
        *alternated,
        Ratio("image queries, client c=16 vs PyTorch one query at a time", _qps(image16),
              _qps(pick(torch, "image")), "queries/s", ">= 3x", bound=3.0),
    ]
    for model, kind in (("query_text", "text"), ("query_image", "image")):
        row = sweep_row(sweeps, model, 1)
        base = pick(onnx, kind)
        out.append(Ratio(f"{model} p50 at c=1 (perf_analyzer) vs ONNX Runtime one {kind} query p50",
                         row.p50_us / 1000.0 if row else None, base.p50_ms if base else None, "ms",
                         "<= 1.5x", lower_is_better=True, bound=1.5))
    out.append(Ratio("ingest items/s vs image_encoder best perf_analyzer infer/s", ingest_items_per_s,
                     best_throughput(sweeps, "image_encoder"), "items/s", ">= 0.8x", bound=0.8))
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def ratio_section(items: Sequence[Ratio], notes: str = "", commands: Sequence[str] = ()) -> ReportSection:
    """The targets table: served, baseline, ratio, target and verdict per comparison."""
    rows = [[r.name, f"{_fmt(r.served)} {r.unit}", f"{_fmt(r.baseline)} {r.unit}",
             "-" if r.value is None else f"{r.value:.2f}x", r.target, r.verdict()] for r in items]
    table = markdown_table(["comparison", "served", "baseline", "ratio", "target", "verdict"], rows,
                           align=["l", "r", "r", "r", "l", "l"])
    return ReportSection(title="Issue #6 targets: served vs in-process", body="\n\n".join(p for p in [notes, table] if p),
                         commands=list(commands), order=12)


def load_table(results: Sequence[LoadResult]) -> str:
    """Markdown rows of closed-loop results."""
    rows = [[r.label, r.concurrency, r.batch, r.requests, round(r.qps, 1), round(r.p50_ms, 1),
             round(r.p90_ms, 1), round(r.p99_ms, 1)] for r in results]
    return markdown_table(["queries", "threads", "batch", "requests", "queries/s", "p50 ms", "p90 ms", "p99 ms"],
                          rows, align=["l", "r", "r", "r", "r", "r", "r", "r"])


def ingest_cpu_table(cpu_ms: dict[str, float], items_per_s: float, image_encoder_best: float | None,
                     cores: int | None = None) -> str:
    """Where an ingested item's CPU went (ms per item by process), and what that allows.

    ``cores`` x 1000 / (CPU ms per item) is the most items/s these cores could ingest with
    every core busy all the time; the measured rate over it is how busy the ingest kept them.
    """
    cores = cores or os.cpu_count() or 1
    total = sum(cpu_ms.values())
    rows = [[name, round(ms, 2), f"{ms / total:.0%}"] for name, ms in cpu_ms.items()]
    rows.append(["**total**", round(total, 2), "100%"])
    table = markdown_table(["process", "CPU ms per item", "share"], rows, align=["l", "r", "r"])
    bound = cores * 1e3 / total
    text = (f"With every one of the {cores} cores busy all the time, {total:.1f} CPU ms per item allow at most "
            f"{bound:.1f} items/s; the ingest reached {items_per_s:.1f} ({items_per_s / bound:.0%} of that).")
    if image_encoder_best:
        text += (f" Against the image encoder's best rate ({image_encoder_best:.1f} infer/s) that bound is "
                 f"{bound / image_encoder_best:.2f}x.")
    return f"CPU per ingested item by process (`/proc`, the median ingest; stubs of one model summed):\n\n{table}\n\n{text}"


def e2e_section(search: Sequence[LoadResult], ingest_items: int | None, ingest_s: float | None,
                notes: str = "", commands: Sequence[str] = (),
                ingest_rounds: Sequence[float] = (), ingest_cpu_ms: dict[str, float] | None = None,
                image_encoder_best: float | None = None) -> ReportSection:
    """Ingest throughput (the median of ``ingest_rounds`` items/s when several), where its
    CPU went (``ingest_cpu_ms``, when measured) and client search latency/throughput."""
    parts = [notes] if notes else []
    if ingest_items is not None and ingest_s:
        rounds = (f"; the median of {len(ingest_rounds)} ingests: "
                  + ", ".join(f"{r:.1f}" for r in ingest_rounds) + " items/s") if len(ingest_rounds) > 1 else ""
        parts.append(f"**Ingest:** {ingest_items} items in {ingest_s:.1f} s = "
                     f"**{ingest_items / ingest_s:.1f} items/s** (`ingest_catalog`, Flat index{rounds}).")
        if ingest_cpu_ms:
            parts.append(ingest_cpu_table(ingest_cpu_ms, ingest_items / ingest_s, image_encoder_best))
    if search:
        parts.append(load_table(search))
    return ReportSection(title="End to end through the xmsearch client", body="\n\n".join(parts),
                         commands=list(commands), order=14)


def baseline_section(torch: Sequence[LoadResult], onnx: Sequence[LoadResult], notes: str = "",
                     commands: Sequence[str] = ()) -> ReportSection:
    """Both in-process baselines, one query at a time and batched."""
    parts = [notes] if notes else []
    if torch:
        parts.append("**(a)/(b) PyTorch ReferencePipeline** (one process, models loaded once):\n\n" + load_table(torch))
    if onnx:
        parts.append("**(c) ONNX Runtime on the repository's exported graphs:**\n\n" + load_table(onnx))
    return ReportSection(title="In-process baselines (same queries, same index)", body="\n\n".join(parts),
                         commands=list(commands), order=16)


def text_model_section(rows: Sequence[tuple[str, int, float, float, float]], notes: str = "",
                       commands: Sequence[str] = ()) -> ReportSection:
    """Issue #7: query_text throughput per text model; rows are (model, c, infer/s, p50 ms, p99 ms)."""
    table = markdown_table(["text model", "concurrency", "infer/s", "p50 ms", "p99 ms"],
                           [[m, c, round(t, 1), round(p50, 1), round(p99, 1)] for m, c, t, p50, p99 in rows],
                           align=["l", "r", "r", "r", "r"])
    return ReportSection(title="Text encoder comparison (issue #7): query_text served",
                         body="\n\n".join(p for p in [notes, table] if p), commands=list(commands), order=25)
