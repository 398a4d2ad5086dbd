"""The two index stores side by side: a directory index (FAISS Flat + SQLite) and a Milvus
collection (Milvus Lite in a local file), same items, same queries, rounds alternated.

Both hold the same random unit vectors of the model's width, with a photo-side vector and a
``colour`` attribute (12 values) per item.  Printed per store: items/s added in chunks of 256
(as ``ingest_catalog`` adds them) with a save at the end, and median milliseconds per call of
``search`` (1 and 16 queries per call), ``search_photo`` and a search filtered to one colour;
and the share of top-10 lists the two return identically (ids in order).

    .venv/bin/python -m benchmarks.milvus_index --rounds 4 --out benchmarks/results/milvus_index.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import publish
from xmsearch.client.stores import create_index

CHUNK = 256
COLOURS = 12


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _build(location, n: int, dim: int, vectors: np.ndarray, photo: np.ndarray):
    idx = create_index(location, dim, fingerprint="bench", photo_vectors=True)
    t0 = time.perf_counter()
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        idx.add([f"sku{i}" for i in range(s, e)], vectors[s:e],
                [{"title": f"item {i}", "colour": f"c{i % COLOURS}"} for i in range(s, e)],
                photo_vectors=photo[s:e])
    idx.save()
    return idx, n / (time.perf_counter() - t0)


def _ms_per_call(fn, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return 1000 * (time.perf_counter() - t0) / len(batches)


CALLS = {
    "search, 1 query": (1, lambda idx, b: idx.search(b, 10)),
    "search, 16 queries": (16, lambda idx, b: idx.search(b, 10)),
    "search_photo, 1 query": (1, lambda idx, b: idx.search_photo(b, 10)),
    "search, 1 query, colour filter": (1, lambda idx, b: idx.search(b, 10, {"colour": "c3"})),
}


def measure(n: int, dim: int, rounds: int, calls: int, rng: np.random.Generator) -> list[str]:
    """Markdown rows for ``n`` items."""
    vectors, photo = _unit(rng, n, dim), _unit(rng, n, dim)
    queries = _unit(rng, 16 * calls, dim)
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        rates = {}
        for name, location in (("FAISS Flat + SQLite", Path(tmp) / "dir"),
                               ("Milvus Lite", f"milvus:{Path(tmp) / 'items.db'}#bench")):
            stores[name], rates[name] = _build(location, n, dim, vectors, photo)
        rows = []
        try:
            a, b = (s.search(queries[:200], 10) for s in stores.values())
            same = np.mean([[h.id for h in x] == [h.id for h in y] for x, y in zip(a, b)])
            for what, (batch, call) in CALLS.items():
                batches = [queries[i:i + batch] for i in range(0, batch * calls, batch)]
                times: dict[str, list[float]] = {name: [] for name in stores}
                for s in stores.values():
                    call(s, batches[0])  # warm up
                for r in range(rounds):
                    for name in (list(stores) if r % 2 == 0 else list(reversed(stores))):
                        times[name].append(_ms_per_call(lambda q, s=stores[name]: call(s, q), batches))
                faiss_ms, milvus_ms = (statistics.median(times[name]) for name in stores)
                rows.append(f"| {n} | {what}, ms per call | {faiss_ms:.3f} | {milvus_ms:.3f} | {milvus_ms / faiss_ms:.2f}x |")
                print(rows[-1], flush=True)
            (faiss_rate, milvus_rate) = rates.values()
            rows.append(f"| {n} | add in chunks of {CHUNK} and save, items/s | {faiss_rate:.0f} | "
                        f"{milvus_rate:.0f} | {milvus_rate / faiss_rate:.2f}x |")
            rows.append(f"| {n} | identical top-10 lists (200 queries) | - | {same:.3f} | - |")
            print(*rows[-2:], sep="\n", flush=True)
        finally:
            for s in stores.values():
                s.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # Not 100k: Milvus Lite tests a filter on every row (about 80 us each), 8 s a filtered query.
    p.add_argument("--items", type=int, nargs="+", default=[1500, 10_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=30, help="calls per round and kind")
    p.add_argument("--out", type=Path, help="also write the table (markdown, with this command) here")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    lines = ["| items | what | FAISS Flat + SQLite | Milvus Lite | Milvus / FAISS |",
             "|---:|---|---:|---:|---:|"]
    for n in a.items:
        lines += measure(n, a.dim, a.rounds, a.calls, rng)
    publish("\n".join(lines), a.out, "benchmarks.milvus_index", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
