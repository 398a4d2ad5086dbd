"""Issue #6's text-throughput ratio, served against ONNX Runtime batched, side by side.

``make bench`` measures the served text queries (the xmsearch client at 16 threads) while
the server is up and the in-process ONNX Runtime baseline minutes later, after the server
has stopped; on a shared machine the load moves between the two, and the ratio of one
run has ranged 0.6x-1.0x.  This measures both in alternated rounds on one private
tritonserver (the cached cpu-target repository of ``make bench``, untrained fusion: speed
does not depend on the weights) and one Flat index of the benchmark catalogue:

* served, answered together: ``Searcher.search`` from ``--concurrency`` threads (default
  16), concurrent queries merged into one request (the client's default);
* served, one request per query: the same through ``Searcher(combine=False)``;
* ONNX Runtime in process, batch B: the repository's own graphs on this process's
  threads, one call per batch of B queries (``benchmarks.baselines.OnnxBaseline``), then
  the same FAISS search, for each ``--batch``.

The server idles while the baseline runs (its members do not spin when idle) and the
baseline's sessions idle while the server is measured; every other round runs the three
in reverse order.  The table gives medians (min-max) over the rounds, and per served row the
spread of its ratio to the best baseline row of the same round; the verdict compares the
median served rate with the median of the rounds' best baseline rates.

    .venv/bin/python -m benchmarks.text_ratio --out benchmarks/results/text_ratio.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

from benchmarks import publish
from benchmarks.loadgen import alternated_figures, closed_loop, timed_batches

TARGET = 0.8  # issue #6: served text queries at c=16 >= 0.8x ONNX Runtime batched
TOGETHER, ONE_BY_ONE = "served, answered together", "served, one request per query"


def baseline_label(batch: int) -> str:
    return f"ONNX Runtime in process, batch {batch}"


def best_baseline(qps: dict[str, list[float]], batches: Sequence[int]) -> list[float]:
    """Per round, the highest baseline queries/s over the batch sizes."""
    return [max(qps[baseline_label(b)][r] for b in batches) for r in range(len(qps[TOGETHER]))]


def summarise(qps: dict[str, list[float]], batches: Sequence[int]) -> str:
    """Markdown: per row the median (min-max) queries/s, and for the served rows the
    median (min-max) over rounds of that round's served / best-baseline ratio."""
    base = best_baseline(qps, batches)
    lines = ["| measure | queries/s, median (min-max) | served / best baseline of the round, median (min-max) |",
             "|---|---:|---:|"]
    for name, xs in qps.items():
        cell = "-"
        if name in (TOGETHER, ONE_BY_ONE):
            ratios = [x / b for x, b in zip(xs, base)]
            cell = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        lines.append(f"| {name} | {statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f}) | {cell} |")
    return "\n".join(lines)


def medians(qps: dict[str, list[float]], batches: Sequence[int]) -> tuple[float, float]:
    """(median queries/s answered together, median over rounds of the round's best baseline)."""
    return statistics.median(qps[TOGETHER]), statistics.median(best_baseline(qps, batches))


def verdict(qps: dict[str, list[float]], batches: Sequence[int]) -> str:
    served, base = medians(qps, batches)
    met = "met" if served / base >= TARGET else "NOT met"
    return (f"Issue #6 target, text queries at the client's default (answered together) >= {TARGET}x ONNX "
            f"Runtime batched: {served:.1f} against {base:.1f} queries/s (medians over the rounds), "
            f"{served / base:.2f}x, **{met}**.")


def run(index_dir: Path, url: str, repository: Path, texts: Sequence[str], rounds: int, seconds: float,
        concurrency: int, batches: Sequence[int], log=print) -> dict[str, list[float]]:
    from benchmarks.baselines import OnnxBaseline
    from xmsearch.client.embed import Embedder
    from xmsearch.client.index import CatalogIndex
    from xmsearch.client.search import Searcher

    embedder = Embedder(url)
    together = Searcher(index_dir, embedder, combine=True)
    one_by_one = Searcher(index_dir, embedder, combine=False)
    onnx = OnnxBaseline(repository)
    index = CatalogIndex.open(index_dir, read_only=True)
    data = list(texts)

    def served(searcher: Searcher) -> Callable[[], float]:
        return lambda: closed_loop(lambda q: searcher.search(text=q, k=10), data, concurrency, seconds,
                                   label="text", warmup_s=min(1.0, seconds)).qps

    def in_process(batch: int) -> Callable[[], float]:
        groups = [[data[(s + j) % len(data)] for j in range(batch)] for s in range(0, len(data), batch)]
        return lambda: timed_batches(lambda g: index.search(onnx.text(g), 10), groups, seconds,
                                     label="text", batch=batch).qps

    calls = {TOGETHER: served(together), ONE_BY_ONE: served(one_by_one)}
    calls.update({baseline_label(b): in_process(b) for b in batches})
    def said(rnd: int, qps: dict[str, list[float]]) -> None:
        log(f"round {rnd + 1}/{rounds}: " + ", ".join(f"{n} {qps[n][-1]:.0f}/s" for n in qps))

    try:
        return alternated_figures(calls, rounds, on_round=said)
    finally:
        index.close()
        together.close()
        one_by_one.close()
        embedder.close()


def main(argv: list[str] | None = None) -> int:
    from benchmarks import stack
    from benchmarks.e2e import load_queries, measure_ingest
    from xmsearch import spec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--text-model", default=spec.DEFAULT_TEXT_MODEL,
                   help=f"text model of the served repository (default: {spec.DEFAULT_TEXT_MODEL}, as make bench)")
    p.add_argument("--items", type=int, default=300, help="demo catalogue size (default: 300, as make bench)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row and round")
    p.add_argument("--concurrency", type=int, default=16, help="client threads of the served rows (default: 16)")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32], help="baseline batch sizes (default: 16 32)")
    p.add_argument("--out", type=Path, help="also write the result here, under the command")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1 or min(args.batch) < 1:
        p.error("--rounds, --concurrency and every --batch must be >= 1, --seconds > 0")
    catalogue = stack.demo_catalogue(args.items, max(30, args.items * 3 // 10))
    repository = stack.exported_repository(args.text_model)
    texts = load_queries(catalogue.queries_file, "text")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with stack.PrivateServer(repository.path, log_file=stack.CACHE_DIR / "tritonserver-text-ratio.log") as server:
        index_dir = stack.CACHE_DIR / "text-ratio-index"
        ingest = measure_ingest(catalogue.catalog_file, index_dir, server.url)
        qps = run(index_dir, server.url, repository.path, texts, args.rounds, args.seconds, args.concurrency,
                  args.batch)
    text = (f"{started}, {args.text_model} (untrained fusion), {ingest.items} items, {len(texts)} text queries; "
            f"{args.rounds} alternated rounds, {args.seconds:g} s per row and round, served rows at "
            f"{args.concurrency} client threads.\n\n{summarise(qps, args.batch)}\n\n{verdict(qps, args.batch)}")
    publish(text, args.out, "benchmarks.text_ratio", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
