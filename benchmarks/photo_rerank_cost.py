"""What the second ranking of photo queries costs the client: ``CatalogIndex.search``
against ``CatalogIndex.search_photo`` (FAISS candidates, photo-side vectors read from
SQLite, a second ranking), same index, same queries, rounds alternated.

The vectors are random unit vectors of the model's width: the cost depends on the sizes,
not on what the vectors mean.  One query per call (a photo search as ``Searcher`` sends it
alone) and 16 per call (a combined round), median milliseconds per call.

    .venv/bin/python -m benchmarks.photo_rerank_cost --out benchmarks/results/photo_rerank_cost.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import publish
from xmsearch.client.index import PHOTO_RERANK_DEPTH, CatalogIndex


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ms_per_call(fn, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return 1000 * (time.perf_counter() - t0) / len(batches)


def measure(n_items: int, factory: str, dim: int, rounds: int, calls: int, rng: np.random.Generator
            ) -> list[tuple[str, int, float, float]]:
    """``(factory, batch, search ms, search_photo ms)`` rows, medians over ``rounds``."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        idx = CatalogIndex.create(Path(tmp) / "i", dim, fingerprint="bench", factory=factory, photo_vectors=True)
        for start in range(0, n_items, 20_000):
            n = min(20_000, n_items - start)
            idx.add([f"sku{start + i}" for i in range(n)], _unit(rng, n, dim),
                    [{"colour": f"c{(start + i) % 12}"} for i in range(n)], photo_vectors=_unit(rng, n, dim))
        queries = _unit(rng, 16 * calls, dim)
        for batch in (1, 16):
            batches = [queries[i:i + batch] for i in range(0, batch * calls, batch)]
            plain, photo = [], []
            idx.search(batches[0], 10), idx.search_photo(batches[0], 10)  # warm caches and threads
            for r in range(rounds):
                order = (plain, photo) if r % 2 == 0 else (photo, plain)
                for target in order:
                    fn = (lambda b: idx.search(b, 10)) if target is plain else (lambda b: idx.search_photo(b, 10))
                    target.append(_ms_per_call(fn, batches))
            rows.append((factory, batch, statistics.median(plain), statistics.median(photo)))
        idx.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--items", type=int, nargs="+", default=[1500, 100_000])
    p.add_argument("--factory", default="Flat")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=50, help="calls per round and batch size")
    p.add_argument("--out", type=Path, help="also write the table (markdown, with this command) here")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    lines = [f"| items | factory | queries per call | search ms | search_photo ms (depth {PHOTO_RERANK_DEPTH}) | ratio |",
             "|---:|---|---:|---:|---:|---:|"]
    for n in a.items:
        for factory, batch, plain, photo in measure(n, a.factory, a.dim, a.rounds, a.calls, rng):
            lines.append(f"| {n} | {factory} | {batch} | {plain:.3f} | {photo:.3f} | {photo / plain:.2f}x |")
            print(lines[-1], flush=True)
    publish("\n".join(lines), a.out, "benchmarks.photo_rerank_cost", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
