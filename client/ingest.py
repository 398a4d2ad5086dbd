"""Catalogue ingestion: catalogue rows -> item ensemble -> FAISS index + metadata.

Rows stream through the server in chunks; after every few chunks the index is saved
atomically, so an interrupted ingest keeps everything saved so far and ``resume=True``
embeds only the rows the index does not hold yet (no duplicates, nothing lost).  A chunk
the server rejects (a corrupt photo, say) is re-sent row by row so that only the bad rows
are skipped, each reported with its line number and the server's reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmsearch.catalog import BadRow, CatalogRow, read_catalog
from xmsearch.client.embed import Embedder, embed_isolating
from xmsearch.client.index import CatalogIndex
from xmsearch.errors import IndexStoreError


@dataclass
class IngestReport:
    index_dir: Path
    rows: int = 0  # rows in the catalogue file
    added: int = 0
    already_indexed: int = 0
    bad: list[BadRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def items_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.added} items added, {self.already_indexed} already indexed, "
                f"{len(self.bad)} bad rows skipped, in {self.seconds:.1f}s "
                f"({self.items_per_second:.1f} items/s)")


def open_or_create(index_dir: Path, embedder: Embedder, factory: str, resume: bool, add: bool,
                   gpu: bool = False) -> CatalogIndex:
    """Open an existing index (resume/add) or create a new one sized for the server."""
    index_dir = Path(index_dir)
    exists = (index_dir / "manifest.json").exists()
    if exists and not (resume or add):
        raise IndexStoreError(f"index {index_dir} already exists: pass --resume to continue an "
                              "interrupted ingest, --add to add items, or choose another --out")
    if not exists and add:
        raise IndexStoreError(f"--add needs an existing index, {index_dir} has none")
    if exists:
        index = CatalogIndex.open(index_dir)
        try:
            index.check_fingerprint(embedder.fingerprint)
            if index.dim != embedder.dim:
                raise IndexStoreError(f"index {index_dir} holds {index.dim}-d vectors, the server "
                                      f"embeds {embedder.dim}-d")
        except BaseException:
            index.close()  # a refused index must not stay locked for writing
            raise
        return index
    return CatalogIndex.create(index_dir, embedder.dim, fingerprint=embedder.fingerprint,
                               factory=factory, gpu=gpu)


def _embed_rows(embedder: Embedder, rows: list[CatalogRow], bad: list[BadRow]
                ) -> tuple[list[CatalogRow], np.ndarray]:
    """Embed rows; isolate rows the server refuses (one request each) instead of failing."""
    ok_rows, photos = [], []
    for r in rows:
        try:
            photos.append(r.image.read_bytes())
            ok_rows.append(r)
        except OSError as e:
            bad.append(BadRow(r.line, r.id, f"cannot read image {r.image}: {e.strerror or e}"))
    if not ok_rows:
        return [], np.zeros((0, embedder.dim), np.float32)
    kept, vectors, refused = embed_isolating(
        lambda idx: embedder.embed_items([ok_rows[i].title for i in idx], [photos[i] for i in idx]),
        len(ok_rows), embedder.dim)
    for i, e in refused.items():
        bad.append(BadRow(ok_rows[i].line, ok_rows[i].id, f"refused by the server: {e}"))
    return [ok_rows[i] for i in kept], vectors


def ingest_catalog(catalog: Path, index_dir: Path, embedder: Embedder, *, factory: str = "Flat",
                   resume: bool = False, add: bool = False, gpu: bool = False, chunk_size: int = 256,
                   save_every: int = 4, nprobe: int | None = None, ef_search: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Embed a catalogue through the item ensemble into the index at ``index_dir``."""
    t0 = time.time()
    embedder.check_ready()
    rows, bad = read_catalog(Path(catalog))
    report = IngestReport(Path(index_dir), rows=len(rows) + len(bad), bad=list(bad))
    index = open_or_create(Path(index_dir), embedder, factory, resume, add, gpu)
    try:
        present = index.contains([r.id for r in rows]) if len(index) else [False] * len(rows)
        todo = []
        for r, p in zip(rows, present):
            if not p:
                todo.append(r)
            elif add:
                report.bad.append(BadRow(r.line, r.id, "id already in the index (delete it first)"))
            else:
                report.already_indexed += 1
        if index.needs_training and todo:
            lo, hi = index.training_size
            sample = todo[: max(lo, min(hi, len(todo)))]
            if len(sample) < lo:
                raise IndexStoreError(f"factory {index.factory!r} needs at least {lo} vectors to train, "
                                      f"the catalogue has {len(sample)} usable rows: use Flat or HNSW32")
            kept, vecs = _embed_rows(embedder, sample, report.bad)
            index.train(vecs)
            if kept:  # the training sample is embedded already: add it, do not embed it twice
                index.add([r.id for r in kept], vecs, [r.metadata() for r in kept])
                report.added += len(kept)
            index.save()
            todo = todo[len(sample):]
        if nprobe is not None or ef_search is not None:
            index.set_search_params(nprobe=nprobe, efSearch=ef_search)
        done = 0
        for n, start in enumerate(range(0, len(todo), chunk_size), start=1):
            chunk = todo[start:start + chunk_size]
            kept, vecs = _embed_rows(embedder, chunk, report.bad)
            if kept:
                index.add([r.id for r in kept], vecs, [r.metadata() for r in kept])
                report.added += len(kept)
            done += len(chunk)
            if n % save_every == 0:
                index.save()
            if progress:
                progress(done, len(todo))
        index.save()
    finally:
        index.close()
    report.bad.sort(key=lambda b: b.line)
    report.seconds = time.time() - t0
    return report
