"""End to end through xmsearch's own client: catalogue ingest and search under load.

* :func:`measure_ingest` -- ``ingest_catalog`` of a catalogue into a fresh Flat index
  (items/s as the client reports it: reading rows and photos, item ensemble requests,
  index writes and saves) and, for a local server, the CPU each process spent per item;
* :func:`measure_search` -- ``Searcher.search`` (query encode over gRPC + FAISS top-10) from
  1, 4, 16 threads sharing one :class:`Searcher`, as a web front end would (concurrent
  queries answered together, the default), then text queries at 16 threads through a
  ``Searcher(combine=False)``: one request and one FAISS search per query.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.loadgen import LoadResult, closed_loop


@dataclass
class IngestResult:
    items: int
    seconds: float
    bad_rows: int
    # CPU ms per item by process: the server's members (``benchmarks.proc_cpu``) and
    # "client" (this process); empty when the server is not a local process.
    cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0


def load_queries(queries_file: Path, kind: str) -> list:
    """Texts (``kind="text"``) or image bytes (``kind="image"``) of that kind of query."""
    rows = [json.loads(line) for line in Path(queries_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind") == kind]
    if kind == "text":
        return [r["text"] for r in rows]
    # Read once: the benchmark measures search, not the disk.
    return [(Path(queries_file).parent / r["image"]).read_bytes() for r in rows]


def measure_ingest(catalog_file: Path, index_dir: Path, url: str, server_pid: int | None = None) -> IngestResult:
    """Ingest ``catalog_file`` into a new Flat index at ``index_dir`` (replaced if present).

    With ``server_pid`` (a tritonserver on this machine) the result also holds the CPU time
    per item of the server, of each model's stubs and of this process."""
    import time

    from benchmarks import proc_cpu
    from xmsearch.client.embed import Embedder
    from xmsearch.client.ingest import ingest_catalog

    shutil.rmtree(index_dir, ignore_errors=True)
    embedder = Embedder(url)
    try:
        before = proc_cpu.tree_cpu_seconds(server_pid) if server_pid else {}
        client0 = time.process_time()
        report = ingest_catalog(Path(catalog_file), Path(index_dir), embedder, factory="Flat")
        client_s = time.process_time() - client0
        after = proc_cpu.tree_cpu_seconds(server_pid) if server_pid else {}
    finally:
        embedder.close()
    cpu = proc_cpu.cpu_per_item(before, after, report.added) if after else {}
    if cpu and report.added:
        cpu["client"] = client_s * 1e3 / report.added
    return IngestResult(items=report.added, seconds=report.seconds, bad_rows=len(report.bad), cpu_ms=cpu)


def median_ingest(results: Sequence[IngestResult]) -> IngestResult | None:
    """The ingest of median items/s (the lower middle one of an even count); None for none."""
    ranked = sorted(results, key=lambda r: r.items_per_second)
    return ranked[(len(ranked) - 1) // 2] if ranked else None


@dataclass(frozen=True)
class SearchPlan:
    levels: tuple[int, ...] = (1, 4, 16)
    duration_s: float = 5.0
    warmup_s: float = 1.0
    uncombined_concurrency: int = 16


def measure_search(index_dir: Path, url: str, texts: Sequence[str], images: Sequence[bytes],
                   plan: SearchPlan = SearchPlan(),
                   on_result: Callable[[LoadResult], None] = lambda r: None) -> list[LoadResult]:
    """Searcher.search for text and image queries at each concurrency; one shared Searcher."""
    from xmsearch.client.embed import Embedder
    from xmsearch.client.search import Searcher

    embedder = Embedder(url)
    searcher = Searcher(Path(index_dir), embedder)
    results: list[LoadResult] = []
    try:
        for kind, data, call in (("text", list(texts), lambda q: searcher.search(text=q, k=10)),
                                 ("image", list(images), lambda q: searcher.search(image=q, k=10))):
            for level in plan.levels:
                result = closed_loop(call, data, level, plan.duration_s, label=kind, warmup_s=plan.warmup_s)
                results.append(result)
                on_result(result)
        results.append(_uncombined(index_dir, embedder, texts, plan))
        on_result(results[-1])
    finally:
        searcher.close()
        embedder.close()
    return results


def _uncombined(index_dir: Path, embedder, texts: Sequence[str], plan: SearchPlan) -> LoadResult:
    from xmsearch.client.search import Searcher

    searcher = Searcher(Path(index_dir), embedder, combine=False)
    try:
        return closed_loop(lambda q: searcher.search(text=q, k=10), list(texts), plan.uncombined_concurrency,
                           plan.duration_s, label="text, one request per query", warmup_s=plan.warmup_s)
    finally:
        searcher.close()


def results_to_json(ingest: IngestResult | None, search: Sequence[LoadResult]) -> str:
    return json.dumps({"ingest": asdict(ingest) if ingest else None,
                       "search": [r.to_dict() for r in search]}, indent=2)
