"""FAISS index benchmark: recall@10 against exact search, throughput, build time, memory.

Vectors are synthetic but shaped like catalogue embeddings: L2-normalised, dim 256,
drawn from a mixture of many clusters (product categories) whose sizes follow a
Zipf-like law (a few huge categories, a long tail) and whose spreads differ.  Queries
come from the same mixture but are fresh draws, never copies of catalogue vectors.
Everything is seeded, so two runs on one machine measure the same problem.

All indexes use inner product (cosine on normalised vectors), as the client does.
IVF variants with the same ``nlist`` share one trained coarse quantizer and one
assignment of the base vectors (to fit the time budget on 2 cores); each row's build
time still *includes* that shared work, i.e. it is what building that index alone costs.

Run from the repo root:  ``python -m benchmarks.faiss_bench [--quick] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from xmsearch.errors import ConfigError

log = logging.getLogger(__name__)

DIM = 256
K = 10
MIN_RECALL = 0.95
MIN_SPEEDUP = 10.0


# --- data ------------------------------------------------------------------------------

def make_vectors(n: int, n_queries: int, dim: int = DIM, n_clusters: int | None = None,
                 seed: int = 0, latent_dim: int = 48, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Seeded clustered, normalised float32 vectors: ``(base [n, dim], queries [n_queries, dim])``.

    Learned embeddings are anisotropic and of low intrinsic dimension, so the mixture is
    drawn in a ``latent_dim``-dimensional space and mapped to ``dim`` by a fixed random
    linear map with a decaying spectrum, plus a little isotropic noise.  ``n_clusters``
    defaults to ``n // 250`` (at least 16): many categories of a few hundred products
    on average, with Zipf(0.8)-distributed sizes and a per-cluster spread.
    """
    if n < 1 or n_queries < 1:
        raise ConfigError(f"faiss bench: need n >= 1 and n_queries >= 1, got {n}, {n_queries}")
    rng = np.random.default_rng(seed)
    k = n_clusters or max(16, n // 250)
    centres = rng.standard_normal((k, latent_dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, k + 1) ** 0.8
    weights /= weights.sum()
    # Per-coordinate noise; |noise| ~ spread relative to a unit centre (cos to centre 0.65-0.9).
    spread = rng.uniform(0.5, 1.2, size=k).astype(np.float32) / np.sqrt(latent_dim, dtype=np.float32)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, latent_dim)))
    spectrum = np.linspace(1.0, 0.3, latent_dim)  # a few dominant directions, as in real encoders
    projection = (basis * spectrum).T.astype(np.float32)  # [latent_dim, dim]
    iso = np.float32(0.15 / np.sqrt(dim))

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, chunk):
            stop = min(count, start + chunk)
            labels = rng.choice(k, size=stop - start, p=weights)
            latent = rng.standard_normal((stop - start, latent_dim), dtype=np.float32)
            latent *= spread[labels, None]
            latent += centres[labels]
            block = latent @ projection
            block += iso * rng.standard_normal((stop - start, dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start:stop] = block
        return out

    return draw(n), draw(n_queries)


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, float]:
    """Exact top-k ids by inner product, and the seconds the search took."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, time.perf_counter() - start


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = K) -> float:
    """Mean fraction of the true top-k found in the returned top-k (ids -1 never match)."""
    hits = 0
    for got, want in zip(found[:, :k], truth[:, :k]):
        hits += len(np.intersect1d(got[got >= 0], want, assume_unique=False))
    return hits / (truth.shape[0] * k)


# --- configurations --------------------------------------------------------------------

@dataclass(frozen=True)
class IndexConfig:
    """One index to build (``factory`` string) and the search parameters to try on it."""

    factory: str
    params: tuple[dict, ...] = ({},)


HNSW_MAX_N = 300_000


def configs_for(n: int, quick: bool, hnsw_max_n: int = HNSW_MAX_N) -> list[IndexConfig]:
    """The indexes benchmarked at ``n`` vectors (``nlist`` about 4 * sqrt(n)).

    HNSW is left out above ``hnsw_max_n``: building HNSW32 over 1M 256-d vectors takes
    several minutes on 2 cores, more than the whole full-mode budget.
    """
    nlist = 1024 if n <= 300_000 else 4096
    if n < 20 * nlist:  # tiny test sizes: keep lists populated
        nlist = max(8, int(4 * np.sqrt(n)) // 8 * 8)
    if quick:
        configs = [
            IndexConfig("Flat"),
            IndexConfig(f"IVF{nlist},Flat", ({"nprobe": 8}, {"nprobe": 32})),
            IndexConfig(f"IVF{nlist},SQ8", ({"nprobe": 16}, {"nprobe": 32})),
            IndexConfig(f"IVF{nlist},PQ32", ({"nprobe": 16},)),
            IndexConfig("HNSW32", ({"efSearch": 32}, {"efSearch": 96})),
        ]
    else:
        # IVF-SQ8 scans a quarter of IVF-Flat's bytes per list: at 1M the lists no longer
        # fit in cache and list scanning is memory-bound, so this is the IVF to beat.
        configs = [
            IndexConfig("Flat"),
            IndexConfig(f"IVF{nlist},Flat", ({"nprobe": 8}, {"nprobe": 16}, {"nprobe": 32}, {"nprobe": 64})),
            IndexConfig(f"IVF{nlist},SQ8", ({"nprobe": 16}, {"nprobe": 32}, {"nprobe": 64})),
            IndexConfig(f"IVF{nlist},PQ32", ({"nprobe": 8}, {"nprobe": 32}, {"nprobe": 128})),
            IndexConfig("HNSW32", ({"efSearch": 32}, {"efSearch": 64}, {"efSearch": 128})),
        ]
    if n > hnsw_max_n:
        configs = [c for c in configs if not c.factory.startswith("HNSW")]
    return configs


# --- measuring -------------------------------------------------------------------------

@dataclass
class FaissRow:
    """One (index, search parameters) point at one database size."""

    n: int
    index: str
    params: str
    recall_at_10: float
    qps: float  # queries/s, all queries in one search call (batched, all threads), best repetition
    latency_ms: float  # median of one-query searches
    build_s: float
    bytes_per_vector: float
    speedup_vs_flat: float = 0.0
    # Queries/s for one query per search call, back to back on one thread (what serving
    # does: one query per request).  0 in results saved before it was measured.
    single_qps: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.index} {self.params}".strip()

    @property
    def single_query_qps(self) -> float:
        """Measured single-query QPS, else derived from the median 1-query latency."""
        if self.single_qps > 0:
            return self.single_qps
        return 1000.0 / self.latency_ms if self.latency_ms > 0 else 0.0


@dataclass
class FaissBenchResult:
    """All rows, the chosen default per size, and how the run was configured."""

    rows: list[FaissRow]
    defaults: dict[int, FaissRow | None]
    settings: dict = field(default_factory=dict)
    command: str = ""

    def to_json(self) -> str:
        return json.dumps({"rows": [asdict(r) for r in self.rows],
                           "defaults": {str(n): (asdict(r) if r else None) for n, r in self.defaults.items()},
                           "settings": self.settings, "command": self.command}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "FaissBenchResult":
        data = json.loads(text)
        return cls(rows=[FaissRow(**r) for r in data["rows"]],
                   defaults={int(n): (FaissRow(**r) if r else None) for n, r in data["defaults"].items()},
                   settings=data.get("settings", {}), command=data.get("command", ""))


def index_bytes(index: faiss.Index) -> int:
    """Serialised size of ``index``, counted without materialising the bytes."""
    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index, writer)
    del writer
    return total


def _apply_params(index: faiss.Index, params: dict) -> None:
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def _batch_qps(index: faiss.Index, queries: np.ndarray, k: int, min_time_s: float) -> tuple[float, np.ndarray]:
    # Best of several repetitions: on a shared machine other processes only ever make a
    # run slower, so the fastest repetition is the least disturbed estimate.
    # At least 3 repetitions for every index, Flat included, so that no configuration's
    # ratio to Flat rests on a single possibly-disturbed run.
    index.search(queries[: min(16, len(queries))], k)  # warm caches and thread pool
    best, spent, runs, ids = float("inf"), 0.0, 0, None
    while spent < min_time_s or runs < 3:
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return len(queries) / best, ids


def _single_queries(index: faiss.Index, queries: np.ndarray, k: int, budget_s: float) -> tuple[float, float]:
    """(median latency ms, queries/s) of one-query searches issued back to back."""
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for q in queries[:200]:
        start = time.perf_counter()
        index.search(q[None, :], k)
        times.append(time.perf_counter() - start)
        if len(times) >= 10 and time.perf_counter() > deadline:
            break
    return float(np.median(times) * 1000.0), len(times) / float(np.sum(times))


class _CoarseCache:
    """Trained coarse centroids and base assignments per nlist, shared by IVF variants."""

    def __init__(self, base: np.ndarray, train: np.ndarray):
        self.base, self.train = base, train
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}

    def get(self, nlist: int) -> tuple[np.ndarray, np.ndarray, float]:
        if nlist not in self._cache:
            start = time.perf_counter()
            # 39 points per centroid, faiss's own minimum: more would not change recall
            # measurably here and the 4096-list k-means must fit the 2-core budget.
            sample = self.train[: min(len(self.train), 39 * nlist)]
            km = faiss.Kmeans(self.base.shape[1], nlist, niter=10, spherical=True, seed=1234,
                              max_points_per_centroid=len(sample) // nlist + 1)
            km.train(sample)
            quantizer = faiss.IndexFlatIP(self.base.shape[1])
            quantizer.add(km.centroids)
            _, assign = quantizer.search(self.base, 1)
            self._cache[nlist] = (km.centroids, assign.ravel(), time.perf_counter() - start)
        return self._cache[nlist]


def _build(config: IndexConfig, base: np.ndarray, train: np.ndarray, coarse: _CoarseCache) -> tuple[faiss.Index, float]:
    index = faiss.index_factory(base.shape[1], config.factory, faiss.METRIC_INNER_PRODUCT)
    if config.factory.startswith("IVF"):
        from faiss.contrib.ivf_tools import add_preassigned

        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, faiss.IndexIVFPQ):
            # Polysemous training (a Hamming-order annealing we never use at search time)
            # costs minutes on 2 cores; 64 points per PQ centroid is plenty for 8-d sub-spaces.
            ivf.do_polysemous_training = False
            ivf.pq.cp.max_points_per_centroid = 64
        centroids, assign, shared_s = coarse.get(ivf.nlist)
        start = time.perf_counter()
        ivf.quantizer.add(centroids)  # a filled quantizer makes train() skip the coarse k-means
        index.train(train)
        add_preassigned(index, base, assign)
        return index, shared_s + time.perf_counter() - start
    start = time.perf_counter()
    if not index.is_trained:
        index.train(train)
    index.add(base)
    return index, time.perf_counter() - start


def bench_size(n: int, quick: bool, n_queries: int, seed: int = 0, k: int = K,
               configs: Sequence[IndexConfig] | None = None, hnsw_max_n: int = HNSW_MAX_N,
               on_row: Callable[[FaissRow], None] | None = None) -> list[FaissRow]:
    """Benchmark every configuration at ``n`` vectors; rows in the order measured."""
    base, queries = make_vectors(n, n_queries, seed=seed)
    truth, _ = exact_neighbours(base, queries, k)
    train = base[np.random.default_rng(seed + 1).permutation(n)[: min(n, 39 * 4096)]]
    coarse = _CoarseCache(base, train)
    min_time = 0.2 if quick else 0.5
    rows: list[FaissRow] = []
    flat_qps = 0.0
    for config in configs or configs_for(n, quick, hnsw_max_n):
        log.info("faiss bench: n=%d building %s", n, config.factory)
        index, build_s = _build(config, base, train, coarse)
        per_vector = index_bytes(index) / n
        for params in config.params:
            _apply_params(index, params)
            qps, ids = _batch_qps(index, queries, k, min_time)
            latency_ms, single_qps = _single_queries(index, queries, k, 1.0 if quick else 2.0)
            row = FaissRow(n=n, index=config.factory,
                           params=" ".join(f"{key}={value}" for key, value in params.items()),
                           recall_at_10=recall_at_k(ids, truth, k), qps=qps, latency_ms=latency_ms,
                           build_s=build_s, bytes_per_vector=per_vector, single_qps=single_qps)
            if config.factory == "Flat":
                flat_qps = qps
            row.speedup_vs_flat = qps / flat_qps if flat_qps else 0.0
            rows.append(row)
            if on_row:
                on_row(row)
        del index
    return rows


def choose_default(rows: Sequence[FaissRow], min_recall: float = MIN_RECALL,
                   min_speedup: float = MIN_SPEEDUP) -> FaissRow | None:
    """The fastest row with recall@10 >= ``min_recall`` and QPS >= ``min_speedup`` x Flat."""
    eligible = [r for r in rows if r.index != "Flat" and r.recall_at_10 >= min_recall
                and r.speedup_vs_flat >= min_speedup]
    return max(eligible, key=lambda r: r.qps) if eligible else None


def choose_default_single(rows: Sequence[FaissRow], min_recall: float = MIN_RECALL,
                          min_speedup: float = MIN_SPEEDUP) -> FaissRow | None:
    """The issue's rule on single-query QPS: fastest one-query-at-a-time row with recall@10 >=
    ``min_recall`` and single-query QPS >= ``min_speedup`` x Flat's single-query QPS (same size)."""
    flat = next((r for r in rows if r.index == "Flat"), None)
    if flat is None or flat.single_query_qps <= 0:
        return None
    eligible = [r for r in rows if r.index != "Flat" and r.recall_at_10 >= min_recall
                and r.single_query_qps >= min_speedup * flat.single_query_qps]
    return max(eligible, key=lambda r: r.single_query_qps) if eligible else None


def describe_single_default(result: FaissBenchResult) -> str:
    """One bullet per size: the single-query rule's pick (the serving default) or why none."""
    out = []
    for n in result.defaults:
        rows = [r for r in result.rows if r.n == n]
        flat = next((r for r in rows if r.index == "Flat"), None)
        row = choose_default_single(rows)
        if row is None or flat is None:
            out.append(f"- At {n:,} vectors no configuration reaches recall@10 >= {MIN_RECALL} with single-query "
                       f"QPS >= {MIN_SPEEDUP:g}x Flat's.")
            continue
        out.append(f"- At {n:,} vectors: **{row.label}** (recall@10 {row.recall_at_10:.3f}, "
                   f"{row.single_query_qps:,.0f} single queries/s = "
                   f"{row.single_query_qps / flat.single_query_qps:.0f}x Flat's {flat.single_query_qps:,.0f}, "
                   f"{row.bytes_per_vector:,.0f} bytes/vector).")
    return "\n".join(out)


def run_faiss_bench(sizes: Sequence[int] | None = None, quick: bool = False, n_queries: int | None = None,
                    seed: int = 0, threads: int | None = None, hnsw_max_n: int = HNSW_MAX_N,
                    on_row: Callable[[FaissRow], None] | None = None) -> FaissBenchResult:
    """Run the benchmark at each size (default 100k and 1M; QUICK: 100k, fewer configs)."""
    sizes = tuple(sizes or ((100_000,) if quick else (100_000, 1_000_000)))
    n_queries = n_queries or (500 if quick else 1000)
    if threads:
        faiss.omp_set_num_threads(threads)
    rows: list[FaissRow] = []
    defaults: dict[int, FaissRow | None] = {}
    load_before, started = _load_average(), time.perf_counter()
    for n in sizes:
        size_rows = bench_size(n, quick, n_queries, seed=seed, hnsw_max_n=hnsw_max_n, on_row=on_row)
        rows += size_rows
        defaults[n] = choose_default(size_rows)
    settings = {"sizes": list(sizes), "quick": quick, "n_queries": n_queries, "seed": seed, "dim": DIM,
                "k": K, "threads": faiss.omp_get_max_threads(), "faiss": faiss.__version__,
                "min_recall": MIN_RECALL, "min_speedup": MIN_SPEEDUP, "hnsw_max_n": hnsw_max_n,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                "wall_s": round(time.perf_counter() - started, 1),
                # Other processes on a shared machine change every number here; say how busy it was.
                "load_avg_1min_before": load_before, "load_avg_1min_after": _load_average()}
    return FaissBenchResult(rows=rows, defaults=defaults, settings=settings)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def format_table(rows: Sequence[FaissRow]) -> str:
    """Markdown table of the rows."""
    flat_single = {r.n: r.single_query_qps for r in rows if r.index == "Flat"}
    lines = ["| n | index | search params | recall@10 | QPS (batch) | x Flat | 1-query ms | 1-query QPS | x Flat (1-query) "
             "| build s | bytes/vector |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        single_x = r.single_query_qps / flat_single[r.n] if flat_single.get(r.n) else 0.0
        lines.append(f"| {r.n:,} | {r.index} | {r.params or '-'} | {r.recall_at_10:.3f} | {r.qps:,.0f} | "
                     f"{r.speedup_vs_flat:.1f} | {r.latency_ms:.2f} | {r.single_query_qps:,.0f} | {single_x:.0f} | "
                     f"{r.build_s:.1f} | {r.bytes_per_vector:,.0f} |")
    return "\n".join(lines)


def best_accurate(rows: Sequence[FaissRow], min_recall: float = MIN_RECALL) -> FaissRow | None:
    """The fastest non-Flat row with recall@10 >= ``min_recall``, whatever its speed-up."""
    accurate = [r for r in rows if r.index != "Flat" and r.recall_at_10 >= min_recall]
    return max(accurate, key=lambda r: r.qps) if accurate else None


def describe_default(result: FaissBenchResult) -> str:
    """One bullet per size: the index the selection rule picks and why, or why none."""
    out = []
    for n, row in result.defaults.items():
        if row is not None:
            out.append(f"- At {n:,} vectors the default is **{row.label}**: the fastest configuration with "
                       f"recall@10 >= {MIN_RECALL} and QPS >= {MIN_SPEEDUP:g}x Flat (recall@10 "
                       f"{row.recall_at_10:.3f}, {row.qps:,.0f} QPS = {row.speedup_vs_flat:.1f}x Flat, "
                       f"{row.bytes_per_vector:,.0f} bytes/vector).")
            continue
        line = (f"- At {n:,} vectors no configuration reaches recall@10 >= {MIN_RECALL} with QPS >= "
                f"{MIN_SPEEDUP:g}x Flat, so the rule picks none (Flat stays the exact fallback).")
        size_rows = [r for r in result.rows if r.n == n]
        near = best_accurate(size_rows)
        flat = next((r for r in size_rows if r.index == "Flat"), None)
        if near is not None and flat is not None:
            line += (f" Closest: {near.label} (recall@10 {near.recall_at_10:.3f}, {near.speedup_vs_flat:.1f}x "
                     f"Flat batched, {flat.latency_ms / near.latency_ms:.0f}x faster than Flat on one query).")
        out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FAISS recall/QPS/build/memory benchmark (synthetic, seeded).")
    parser.add_argument("--quick", action="store_true", help="100k vectors only, fewer configurations (~1 min)")
    parser.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                        help="comma-separated database sizes, e.g. 100000,1000000")
    parser.add_argument("--queries", type=int, help="number of queries (default 1000; QUICK 500)")
    parser.add_argument("--threads", type=int, help="OpenMP threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hnsw-max-n", type=int, default=HNSW_MAX_N,
                        help="largest size at which HNSW32 is built (default %(default)s: HNSW at 1M "
                             "takes minutes on 2 cores); pass 1000000 to include it")
    parser.add_argument("--out", type=Path, help="folder to write faiss.json and faiss.md into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_faiss_bench(args.sizes, quick=args.quick, n_queries=args.queries, seed=args.seed,
                             threads=args.threads, hnsw_max_n=args.hnsw_max_n,
                             on_row=lambda r: print(f"  {r.n:>9,} {r.label:<28} recall@10={r.recall_at_10:.3f} "
                                                    f"qps={r.qps:,.0f} build={r.build_s:.1f}s", flush=True))
    result.command = shlex.join([Path(sys.executable).name, "-m", "benchmarks.faiss_bench",
                                 *(argv if argv is not None else sys.argv[1:])])
    print(format_table(result.rows))
    print(describe_default(result))
    print(describe_single_default(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "faiss.json").write_text(result.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
