"""Catalogue ingestion: catalogue rows -> item ensemble -> index (FAISS + metadata, or Milvus).

Rows go to the server as one stream of small requests, several in flight, and come back
into the index in order, a chunk at a time; after every few chunks the index is saved
atomically, so an interrupted ingest keeps everything saved so far and ``resume=True``
embeds only the rows the index does not hold yet (no duplicates, nothing lost).  A request
the server rejects (a corrupt photo, say) is re-sent row by row so that only the bad rows
are skipped, each reported with its line number and the server's reason.

With ``photo_views=N`` an item's photo-side vector (by which photo queries are ranked) also
averages the photo embeddings of N re-shots of its photo (:mod:`xmsearch.reshoot`: new
backdrop, framing and light, the same for the same item id), sent through the
``query_image`` ensemble: a shopper's photo, from another shoot, then finds its product
more often, for N more image-encoder passes per item.

The index is a directory or a Milvus collection (:mod:`xmsearch.client.stores`).  A Milvus
collection keeps each chunk once it is added rather than at the next save, so an interrupted
ingest into one keeps every chunk it finished; ``resume=True`` works the same on both.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmsearch import spec as S
from xmsearch.catalog import BadRow, CatalogRow, read_catalog
from xmsearch.client.embed import Embedder, embed_isolating, stack_rows
from xmsearch.client.index import CatalogIndex, check_photo_views
from xmsearch.client.milvus import MilvusIndex
from xmsearch.client.stores import Location, create_index, index_exists, open_index, parse_location
from xmsearch.errors import IndexStoreError, InputError
from xmsearch.reshoot import photo_views as render_photo_views

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    index_dir: Location  # a directory, or a Milvus collection
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


def open_or_create(index_dir: Location, embedder: Embedder, factory: str, resume: bool, add: bool,
                   gpu: bool = False, photo_views: int | None = None) -> CatalogIndex | MilvusIndex:
    """Open an existing index (resume/add) or create a new one sized for the server.

    ``photo_views``: None takes an existing index's setting (0 for a new one); a number an
    existing index was not built with is refused, so that all its items are alike."""
    index_dir = parse_location(index_dir)
    exists = index_exists(index_dir)
    if exists and not (resume or add):
        raise IndexStoreError(f"index {index_dir} already exists: pass --resume to continue an "
                              "interrupted ingest, --add to add items, or choose another --out")
    if not exists and add:
        raise IndexStoreError(f"--add needs an existing index, {index_dir} has none")
    if exists:
        index = open_index(index_dir)
        try:
            index.check_fingerprint(embedder.fingerprint)
            if index.dim != embedder.dim:
                raise IndexStoreError(f"index {index_dir} holds {index.dim}-d vectors, the server "
                                      f"embeds {embedder.dim}-d")
            if index.has_photo_vectors and not embedder.serves_photo_vectors:
                raise IndexStoreError(f"index {index_dir} keeps a photo-side vector per item and the "
                                      f"server's {S.ITEM!r} ensemble returns none ({S.PHOTO_EMBEDDING}): "
                                      "serve the model repository the index was built with")
            if photo_views is not None and photo_views != index.photo_views:
                raise IndexStoreError(f"index {index_dir} was built with {index.photo_views} photo views "
                                      f"per item, not {photo_views}: leave --photo-views out to use "
                                      "its setting, or build a new index")
        except BaseException:
            index.close()  # a refused index must not stay locked for writing
            raise
        return index
    photo = embedder.serves_photo_vectors
    if photo_views and not photo:
        raise IndexStoreError(f"--photo-views averages re-shots into each item's photo-side vector, and the "
                              f"server's {S.ITEM!r} ensemble returns none ({S.PHOTO_EMBEDDING}): export "
                              "the model repository again with this xmsearch")
    return create_index(index_dir, embedder.dim, fingerprint=embedder.fingerprint,
                        factory=factory, gpu=gpu, photo_vectors=photo, photo_views=photo_views or 0)


def _width(index: CatalogIndex | MilvusIndex) -> int:
    """Columns per embedded row: the item vector, then the photo-side one where the index keeps it."""
    return index.dim * (2 if index.has_photo_vectors else 1)


def _add(index: CatalogIndex | MilvusIndex, rows: list[CatalogRow], vectors: np.ndarray) -> None:
    d = index.dim
    index.add([r.id for r in rows], vectors[:, :d], [r.metadata() for r in rows],
              photo_vectors=vectors[:, d:] if index.has_photo_vectors else None)


def with_photo_views(embedder: Embedder, rows: list[CatalogRow], photos: list[bytes],
                     photo_vectors: np.ndarray, views: int) -> np.ndarray:
    """``normalise(p + normalise(e_1 + ... + e_views))`` for each row's photo-side vector
    ``p``, where ``e_k`` is the photo embedding (``query_image``) of the k-th re-shot of
    its photo.  A photo that cannot be re-shot keeps ``p`` (logged)."""
    shots, owners = [], []
    for k, (row, photo) in enumerate(zip(rows, photos)):
        try:
            shots += render_photo_views(photo, row.id, views)
            owners.append(k)
        except Exception as e:  # noqa: BLE001 - the server took the photo; a re-shot is a bonus
            log.warning("line %d (%s): photo kept without re-shots: %s", row.line, row.id, e)
    out = np.array(photo_vectors, dtype=np.float32, copy=True)
    if not shots:
        return out
    e = embedder.embed_queries(images=shots).reshape(len(owners), views, -1).sum(1)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    mixed = out[owners] + e
    out[owners] = mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)
    return out


def _embed_rows(embedder: Embedder, rows: list[CatalogRow], bad: list[BadRow], width: int,
                photo_views: int = 0) -> tuple[list[CatalogRow], np.ndarray]:
    """Embed rows (``width`` columns each: the item vector, and the photo-side vector when
    twice the embedding width, with ``photo_views`` re-shots averaged in); isolate rows the
    server refuses (one request each)."""
    photo = width != embedder.dim
    ok_rows, photos = [], []
    for r in rows:
        try:
            photos.append(r.image.read_bytes())
            ok_rows.append(r)
        except OSError as e:
            bad.append(BadRow(r.line, r.id, f"cannot read image {r.image}: {e.strerror or e}"))
    if not ok_rows:
        return [], stack_rows([], width)
    kept, vectors, refused = embed_isolating(
        lambda idx: embedder.embed_items([ok_rows[i].title for i in idx], [photos[i] for i in idx],
                                         photo=photo),
        len(ok_rows), width)
    for i, e in refused.items():
        bad.append(BadRow(ok_rows[i].line, ok_rows[i].id, f"refused by the server: {e}"))
    if photo and photo_views and kept:
        d = embedder.dim
        vectors[:, d:] = with_photo_views(embedder, [ok_rows[i] for i in kept], [photos[i] for i in kept],
                                          vectors[:, d:], photo_views)
    return [ok_rows[i] for i in kept], vectors


_QUEUED_PER_SLOT = 4  # requests queued per in-flight slot, ahead of the oldest unfinished one


def _embedded_chunks(embedder: Embedder, chunks: list[list[CatalogRow]], bad: list[BadRow],
                     request_rows: int, in_flight: int, width: int, photo_views: int = 0
                     ) -> Iterator[tuple[list[CatalogRow], list[CatalogRow], np.ndarray]]:
    """``(chunk, kept rows, vectors)`` for each chunk, in order.

    The chunks go out as one stream of requests of ``request_rows`` rows, ``in_flight`` at a
    time, that does not stop at chunk ends: the server works on the next chunk's rows while
    the last requests of a chunk finish and the caller adds it to the index.  More requests
    than ``in_flight`` are queued, so that one slow request does not hold back the ones after
    it (results are taken in order)."""
    pieces = ((c, chunk[s:s + request_rows]) for c, chunk in enumerate(chunks)
              for s in range(0, len(chunk), request_rows))
    queued: deque[tuple[int, Future]] = deque()
    kept: list[CatalogRow] = []
    vectors: list[np.ndarray] = []
    current = 0  # the chunk whose pieces are being collected
    with ThreadPoolExecutor(in_flight, thread_name_prefix="ingest") as pool:
        try:
            while True:
                while len(queued) < _QUEUED_PER_SLOT * in_flight:
                    nxt = next(pieces, None)
                    if nxt is None:
                        break
                    queued.append((nxt[0], pool.submit(_embed_rows, embedder, nxt[1], bad, width, photo_views)))
                if not queued:
                    break
                c, fut = queued.popleft()
                if c != current:  # chunk `current` is complete (pieces arrive in order)
                    yield chunks[current], kept, stack_rows(vectors, width)
                    kept, vectors, current = [], [], c
                rows, vecs = fut.result()
                kept += rows
                vectors.append(vecs)
            if chunks:
                yield chunks[current], kept, stack_rows(vectors, width)
        finally:  # stopped early (an error, an interrupt): send nothing more
            for _, fut in queued:
                fut.cancel()


def ingest_catalog(catalog: Path, index_dir: Location | str, embedder: Embedder, *, factory: str = "Flat",
                   resume: bool = False, add: bool = False, gpu: bool = False, chunk_size: int = 256,
                   save_every: int = 4, request_rows: int = 8, in_flight: int = 4,
                   nprobe: int | None = None, ef_search: int | None = None, photo_views: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Embed a catalogue through the item ensemble into the index at ``index_dir``.

    Chunks of ``chunk_size`` rows are added (and every ``save_every`` chunks saved) in
    catalogue order; the rows go to the server in requests of ``request_rows``, ``in_flight``
    of them at a time, in one stream across chunks.  ``photo_views`` re-shots of each photo
    are averaged into its photo-side vector (None: an existing index's setting, else 0)."""
    for name, value in (("chunk_size", chunk_size), ("save_every", save_every),
                        ("request_rows", request_rows), ("in_flight", in_flight)):
        if value < 1:
            raise InputError(f"ingest: {name} must be at least 1, got {value}")
    if photo_views is not None:
        check_photo_views(photo_views, None, "ingest")
    t0 = time.time()
    embedder.check_ready()
    rows, bad = read_catalog(Path(catalog))
    index_dir = parse_location(index_dir)
    report = IngestReport(index_dir, rows=len(rows) + len(bad), bad=list(bad))
    index = open_or_create(index_dir, embedder, factory, resume, add, gpu, photo_views)
    views = index.photo_views  # nonzero only where the index keeps photo-side vectors (create)
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
            with closing(_embedded_chunks(embedder, [sample], report.bad, request_rows, in_flight,
                                          _width(index), views)) as one:
                _, kept, vecs = next(one)
            index.train(vecs[:, :index.dim])
            if kept:  # the training sample is embedded already: add it, do not embed it twice
                _add(index, kept, vecs)
                report.added += len(kept)
            index.save()
            todo = todo[len(sample):]
        if nprobe is not None or ef_search is not None:
            index.set_search_params(nprobe=nprobe, efSearch=ef_search)
        done = 0
        chunks = [todo[start:start + chunk_size] for start in range(0, len(todo), chunk_size)]
        with closing(_embedded_chunks(embedder, chunks, report.bad, request_rows, in_flight,
                                      _width(index), views)) as embedded:
            for n, (chunk, kept, vecs) in enumerate(embedded, start=1):
                if kept:
                    _add(index, kept, vecs)
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
