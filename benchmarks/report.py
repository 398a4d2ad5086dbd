"""Benchmark report: REPORT.md with every table and the exact command behind it, plus PNG plots.

The report is a list of :class:`ReportSection` (title, markdown body, commands, figures)
under a header describing the machine and the versions measured.  Built-in sections
come from perf_analyzer sweeps (:func:`sweep_section`) and the FAISS benchmark
(:func:`faiss_section`); any other benchmark (end-to-end client numbers, in-process
baselines, ...) plugs in either by passing a :func:`table_section` or, from another
process, by dropping a JSON file into ``<results>/sections/`` (see
:func:`write_section_file`): :func:`build_report` picks those up in ``order``.

Regenerate from saved results without re-measuring:
``python -m benchmarks.report --results benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.faiss_bench import (FaissBenchResult, describe_default, describe_single_default,  # noqa: E402
                                    format_table)
from benchmarks.perf_sweep import SweepResult  # noqa: E402
from xmsearch import spec  # noqa: E402
from xmsearch.errors import InputError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VERSION_PACKAGES = ("tritonclient", "onnxruntime", "torch", "faiss-cpu", "numpy", "nvidia-pytriton")


@dataclass
class ReportSection:
    """One part of the report: a heading, markdown, the commands that produced it, its plots."""

    title: str
    body: str
    commands: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # paths relative to the report folder
    order: int = 50  # sections sort by (order, title)


# --- machine and versions ------------------------------------------------------------------

def machine_info() -> dict[str, str]:
    """CPU model, core count, RAM, load and OS of the machine running the benchmark."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 ** 2:.1f} GiB"
                break
    except OSError:
        pass
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    glibc = " ".join(platform.libc_ver()) or "unknown"
    return {"CPU": cpu, "cores": str(os.cpu_count()), "RAM": ram,
            "load average (1/5/15 min) when the report was written": load,
            "OS": f"{platform.system()} {platform.release()}", "libc": glibc,
            "Python": platform.python_version()}


def package_versions(tritonserver: str | None = None, perf_analyzer: str | None = None,
                     extra: dict[str, str] | None = None) -> dict[str, str]:
    """Installed versions of the packages the numbers depend on (not imported: no torch start-up)."""
    versions: dict[str, str] = {"tritonserver": tritonserver or "not measured in this run"}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["perf_analyzer"] = perf_analyzer or "not used in this run"
    versions.update(extra or {})
    return versions


# --- tables ------------------------------------------------------------------------------

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; ``align`` holds 'l' or 'r' per column (default: numbers right)."""
    if any(len(r) != len(headers) for r in rows):
        raise InputError(f"report table: every row needs {len(headers)} cells ({list(headers)})")

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v).replace("|", "\\|")

    if align is None:
        align = ["r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers))]
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _ms(us: float | None) -> float | str:
    return "-" if us is None else us / 1000.0


def sweep_table(result: SweepResult) -> str:
    """Throughput, client percentiles and the server-side breakdown per concurrency (ms)."""
    headers = ["concurrency", "infer/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "server queue ms",
               "compute input ms", "compute infer ms", "compute output ms"]
    rows = [[r.concurrency, r.throughput, _ms(r.p50_us), _ms(r.p90_us), _ms(r.p95_us), _ms(r.p99_us),
             _ms(r.server_queue_total_us), _ms(r.server_compute_input_us), _ms(r.server_compute_infer_us),
             _ms(r.server_compute_output_us)] for r in result.rows]
    return markdown_table(headers, rows)


def composing_table(result: SweepResult) -> str | None:
    """Per-composing-model breakdown for an ensemble (None for a plain model)."""
    rows = [[r.concurrency, c.model, c.avg_batch, _ms(c.queue_us), _ms(c.compute_input_us),
             _ms(c.compute_infer_us), _ms(c.compute_output_us), _ms(c.latency_us)]
            for r in result.rows for c in r.composing]
    if not rows:
        return None
    return markdown_table(["concurrency", "member", "avg batch", "queue ms", "compute input ms",
                           "compute infer ms", "compute output ms", "request ms"], rows,
                          align=["r", "l", "r", "r", "r", "r", "r", "r"])


# --- plots -------------------------------------------------------------------------------

def plot_latency_throughput(results: Sequence[SweepResult], path: Path) -> Path:
    """One panel per model: p50 and p99 latency against throughput, points labelled by concurrency."""
    if not results:
        raise InputError("latency plot: no sweep results to plot")
    cols = min(2, len(results))
    nrows = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.4 * nrows), squeeze=False)
    for ax, result in zip(axes.flat, results):
        x = [r.throughput for r in result.rows]
        for attr, style, label in [("p50_us", "o-", "p50"), ("p99_us", "s--", "p99")]:
            ax.plot(x, [getattr(r, attr) / 1000.0 for r in result.rows], style, label=label)
        for r in result.rows:
            ax.annotate(f"c={r.concurrency}", (r.throughput, r.p99_us / 1000.0), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color="0.35")
        # From zero: a narrow automatic range makes a flat (saturated) curve look steep.
        ax.set_xlim(left=0, right=max(x) * 1.15)
        ax.set_ylim(bottom=0)
        ax.set_title(result.model)
        ax.set_xlabel("throughput (inferences/s)")
        ax.set_ylabel("client latency (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left")
    for ax in list(axes.flat)[len(results):]:
        ax.set_visible(False)
    fig.suptitle("perf_analyzer: latency vs throughput (gRPC, one point per concurrency)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recall_qps(result: FaissBenchResult, path: Path) -> Path:
    """Recall@10 against batched QPS (log scale), one panel per database size."""
    sizes = sorted({r.n for r in result.rows})
    if not sizes:
        raise InputError("FAISS plot: no rows to plot")
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.4 * len(sizes), 4.6), squeeze=False)
    min_recall = result.settings.get("min_recall", 0.95)
    min_speedup = result.settings.get("min_speedup", 10.0)
    for ax, n in zip(axes.flat, sizes):
        rows = [r for r in result.rows if r.n == n]
        for index in dict.fromkeys(r.index for r in rows):
            pts = [r for r in rows if r.index == index]
            ax.plot([r.recall_at_10 for r in pts], [r.qps for r in pts], "o-", label=index)
            for r in pts:
                if r.params:
                    ax.annotate(r.params.split("=")[-1], (r.recall_at_10, r.qps), textcoords="offset points",
                                xytext=(4, -10), fontsize=7, color="0.35")
        flat = next((r for r in rows if r.index == "Flat"), None)
        if flat:
            ax.axhline(flat.qps * min_speedup, color="0.5", ls=":", lw=1, label=f"{min_speedup:g}x Flat QPS")
        ax.axvline(min_recall, color="0.5", ls="--", lw=1, label=f"recall@10 = {min_recall}")
        chosen = result.defaults.get(n)
        if chosen:
            ax.plot([chosen.recall_at_10], [chosen.qps], marker="*", ms=16, color="gold", mec="k",
                    ls="none", label=f"default: {chosen.label}")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 vs exact search")
        ax.set_ylabel("queries/s (batched, log scale)")
        ax.set_title(f"{n:,} vectors, dim {result.settings.get('dim', 256)}")
        ax.grid(True, which="both", alpha=0.3)
        # PQ sits far left and the accurate indexes far right: the middle stays free.
        ax.legend(fontsize=7, loc="lower center")
    fig.suptitle("FAISS: recall vs throughput (labels: nprobe / efSearch)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- sections ----------------------------------------------------------------------------

def _display_command(command: str) -> str:
    # Commands run from the repo root; absolute repo paths only make them longer.
    return command.replace(str(REPO) + os.sep, "").replace(sys.executable, "python")


def sweep_section(results: Sequence[SweepResult], out_dir: Path) -> ReportSection:
    """Tables, breakdowns and the latency/throughput plot for perf_analyzer sweeps."""
    figure = plot_latency_throughput(results, out_dir / "latency_throughput.png")
    parts = ["Client latencies are perf_analyzer's (gRPC, batch 1 per request, one request "
             "in flight per concurrency slot); server columns are Triton's averages per request. "
             "For an ensemble, *server queue* adds its members' queues (perf_analyzer's CSV "
             "counts only the ensemble scheduler's own queue) and the compute columns are sums over "
             "its members, so with parallel branches (text and image) they can exceed the client "
             "latency. The member table shows each step and how many requests the dynamic batcher "
             "merged per execution (avg batch)."]
    commands: list[str] = []
    for result in results:
        parts.append(f"### {result.model}\n\n{sweep_table(result)}")
        members = composing_table(result)
        if members:
            parts.append(f"Composing models of `{result.model}`:\n\n{members}")
        if result.skipped:
            parts.append(f"No stable measurement at concurrency {result.skipped}: those levels are missing.")
        commands.append(f"# {result.model}\n" + _display_command(result.command_text()))
    return ReportSection(title="Triton models under load (perf_analyzer)", body="\n\n".join(parts),
                         commands=commands, figures=[figure.name], order=10)


def faiss_section(result: FaissBenchResult, out_dir: Path) -> ReportSection:
    """The FAISS table, the chosen default and the recall/QPS plot."""
    figure = plot_recall_qps(result, out_dir / "faiss_recall_qps.png")
    s = result.settings
    intro = (f"Synthetic catalogue embeddings (seed {s.get('seed')}, dim {s.get('dim')}, a mixture of many "
             f"clusters with Zipf-distributed sizes, normalised), {s.get('n_queries')} fresh queries, inner "
             f"product, {s.get('threads')} threads, faiss {s.get('faiss')}. *QPS* is the best of repeated "
             "batched searches of all queries; *1-query ms* the median latency of single-query searches; "
             "*build s* covers training and adding (IVF variants include the coarse k-means and assignment "
             "they share in this run); *bytes/vector* is the serialised index size divided by n. A batched Flat "
             "search is one BLAS matrix product, which is why the approximate indexes gain far less over "
             "Flat on batches than on single queries.")
    if s.get("wall_s") is not None:
        intro += (f" The run took {s['wall_s']:.0f} s; the 1-minute load average was "
                  f"{s.get('load_avg_1min_before')} before and {s.get('load_avg_1min_after')} after "
                  f"on {machine_info()['cores']} cores.")
    if s.get("hnsw_max_n") and any(n > s["hnsw_max_n"] for n in s.get("sizes", [])):
        intro += (f" HNSW32 is measured up to {s['hnsw_max_n']:,} vectors only: its build over 1M vectors "
                  "takes minutes on 2 cores (include it with `--hnsw-max-n 1000000`).")
    measured = all(r.single_qps > 0 for r in result.rows)
    rule = (f"**Default index rule, batched view:** the fastest configuration (batched QPS) with recall@10 >= "
            f"{s.get('min_recall')} and QPS >= {s.get('min_speedup'):g}x Flat at the same size.\n\n"
            + describe_default(result)
            + f"\n\n**Default index rule, single-query view (the serving default):** serving sends one query per "
              f"request, so the rule is applied to *1-query QPS* (one query per search call, back to back on one "
              f"thread{'' if measured else '; derived here as 1000 / median 1-query ms because these results were saved before it was measured'}): "
              f"recall@10 >= {s.get('min_recall')} and 1-query QPS >= {s.get('min_speedup'):g}x Flat's.\n\n"
            + describe_single_default(result))
    body = "\n\n".join([intro, format_table(result.rows), rule])
    return ReportSection(title="FAISS index benchmark", body=body,
                         commands=[_display_command(result.command)] if result.command else [],
                         figures=[figure.name], order=30)


def table_section(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]],
                  commands: Sequence[str] = (), notes: str = "", order: int = 50) -> ReportSection:
    """A generic table section, for benchmarks added later (end-to-end, baselines)."""
    body = "\n\n".join(p for p in [notes, markdown_table(headers, rows)] if p)
    return ReportSection(title=title, body=body, commands=[_display_command(c) for c in commands], order=order)


def write_section_file(results_dir: Path, name: str, section: ReportSection) -> Path:
    """Save ``section`` as ``<results>/sections/<name>.json`` for :func:`build_report` to include."""
    path = Path(results_dir) / "sections" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(section), indent=2))
    return path


def load_section_files(results_dir: Path) -> list[ReportSection]:
    """Sections saved by :func:`write_section_file` (or by hand, same keys)."""
    sections = []
    for path in sorted((Path(results_dir) / "sections").glob("*.json")):
        try:
            sections.append(ReportSection(**json.loads(path.read_text())))
        except (json.JSONDecodeError, TypeError) as e:
            raise InputError(f"report: section file {path} is not a valid section ({e}); "
                             "write it with benchmarks.report.write_section_file") from e
    return sections


# --- the report --------------------------------------------------------------------------

def render_report(sections: Sequence[ReportSection], machine: dict[str, str], versions: dict[str, str],
                  title: str = "xmsearch benchmark report") -> str:
    """The markdown text of the report."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# {title}", "", f"Written {now} by `python -m benchmarks.report`. "
           "Every number below was measured on this machine; the command under each section reproduces it "
           "(run from the repository root).", "", "## Machine", "",
           markdown_table(["item", "value"], [[k, v] for k, v in machine.items()], align=["l", "l"]), "",
           "## Versions", "", markdown_table(["component", "version"], [[k, v] for k, v in versions.items()],
                                             align=["l", "l"]), ""]
    if not sections:
        out += ["_No benchmark results were found._", ""]
    for section in sorted(sections, key=lambda s: (s.order, s.title)):
        out += [f"## {section.title}", "", section.body.strip(), ""]
        out += [f"![{section.title}]({fig})\n" for fig in section.figures]
        if section.commands:
            out += ["Command:" if len(section.commands) == 1 else "Commands:", "", "```sh",
                    "\n".join(c.strip() for c in section.commands), "```", ""]
    return "\n".join(out)


def write_report(out_dir: Path, sections: Sequence[ReportSection], machine: dict[str, str] | None = None,
                 versions: dict[str, str] | None = None) -> Path:
    """Write ``<out_dir>/REPORT.md`` (figures are already in ``out_dir``); return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render_report(sections, machine or machine_info(), versions or package_versions())
    path = out_dir / "REPORT.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def load_sweeps(results_dir: Path) -> list[SweepResult]:
    """Sweep results saved by :func:`benchmarks.perf_sweep.run_sweep` under ``<results>/perf/``.

    Ordered as :data:`xmsearch.spec.ENSEMBLES` (text, image, text+image, item), others after.
    """
    results = [SweepResult.from_json(p.read_text()) for p in (Path(results_dir) / "perf").glob("*.json")]
    rank = {name: i for i, name in enumerate(spec.ENSEMBLES)}
    return sorted(results, key=lambda r: (rank.get(r.model, len(rank)), r.model))


def build_report(results_dir: Path, tritonserver: str | None = None, perf_analyzer: str | None = None) -> Path:
    """Assemble REPORT.md from everything saved under ``results_dir``."""
    results_dir = Path(results_dir)
    sections: list[ReportSection] = []
    sweeps = load_sweeps(results_dir)
    if sweeps:
        sections.append(sweep_section(sweeps, results_dir))
    faiss_json = results_dir / "faiss.json"
    if faiss_json.is_file():
        sections.append(faiss_section(FaissBenchResult.from_json(faiss_json.read_text()), results_dir))
    sections += load_section_files(results_dir)
    meta_path = results_dir / "versions.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    versions = package_versions(tritonserver or meta.get("tritonserver"),
                                perf_analyzer or meta.get("perf_analyzer"))
    return write_report(results_dir, sections, versions=versions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write REPORT.md and plots from saved benchmark results.")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                        help="results folder (perf/*.json, faiss.json, sections/*.json); default %(default)s")
    args = parser.parse_args(argv)
    print(build_report(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
