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

With ``alt_titles=True`` an item's searched vector also takes in its other titles (the
``alt_titles`` field: the title in another language, another wording), each embedded as a
text query (``query_text``): ``normalise(v + ALT_TITLE_WEIGHT * normalise(t_1 + ... + t_n))``.
A shopper's words then meet every way the catalogue names the product, not only the first.

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
from xmsearch.catalog import BadRow, CatalogRow, alt_titles, read_catalog
from xmsearch.client.embed import Embedder, embed_isolating, stack_rows
from xmsearch.client.index import CatalogIndex, check_alt_titles, check_photo_views
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
                   gpu: bool = False, photo_views: int | None = None, alt_titles: bool | None = None
                   ) -> CatalogIndex | MilvusIndex:
    """Open an existing index (resume/add) or create a new one sized for the server.

    ``photo_views``, ``alt_titles``: None takes an existing index's setting (0 / False for a new
    one); a setting an existing index was not built with is refused, so that all its items are
    alike."""
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
            if alt_titles is not None and alt_titles != index.alt_titles:
                raise IndexStoreError(f"index {index_dir} was built {'with' if index.alt_titles else 'without'} "
                                      "the items' other titles in their vectors: leave --alt-titles / "
                                      "--no-alt-titles out to use its setting, or build a new index")
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
                        factory=factory, gpu=gpu, photo_vectors=photo, photo_views=photo_views or 0,
                        alt_titles=bool(alt_titles))


def _width(index: CatalogIndex | MilvusIndex) -> int:
    """Columns per embedded row: the item vector, then the photo-side one where the index keeps it."""
    return index.dim * (2 if index.has_photo_vectors else 1)


def _add(index: CatalogIndex | MilvusIndex, rows: list[CatalogRow], vectors: np.ndarray) -> None:
    d = index.dim
    index.add([r.id for r in rows], vectors[:, :d], [r.metadata() for r in rows],
              photo_vectors=vectors[:, d:] if index.has_photo_vectors else None)


# How much of an item's other titles goes into its searched vector (alt_titles=True): 1
# against 0.25 / 0.5 / 2 on the demo's development queries, the demo checkpoint: text R@10
# 0.874 -> 0.892 / 0.896 / 0.901 / 0.895, photo+text 0.787 -> 0.811 / 0.825 / 0.832 / 0.831
# (benchmarks/results/quality_ab.md, 2026-12-07 evening).
ALT_TITLE_WEIGHT = 1.0


def mix_in(vectors: np.ndarray, owners, extra: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """A copy of ``vectors`` where each row that owns rows of ``extra`` (``owners[j]``: the row
    ``extra[j]`` belongs to) becomes ``normalise(v + weight * normalise(sum of its extra rows))``."""
    out = np.array(vectors, dtype=np.float32, copy=True)
    owners = np.asarray(owners, dtype=np.int64)
    if not len(owners):
        return out
    summed = np.zeros_like(out)
    np.add.at(summed, owners, np.asarray(extra, dtype=np.float32))
    rows = np.unique(owners)
    e = summed[rows] / np.maximum(np.linalg.norm(summed[rows], axis=1, keepdims=True), 1e-12)
    mixed = out[rows] + weight * e
    out[rows] = mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)
    return out


def with_alt_titles(embedder: Embedder, rows: list[CatalogRow], vectors: np.ndarray) -> np.ndarray:
    """Each row's searched vector with its other titles (:func:`xmsearch.catalog.alt_titles`)
    mixed in (:func:`mix_in`, ``ALT_TITLE_WEIGHT``), each embedded as a text query.  A title the
    server refuses (too long, say) is left out, logged; rows without other titles keep theirs."""
    texts, owners = [], []
    for k, row in enumerate(rows):
        for title in alt_titles(row):
            texts.append(title)
            owners.append(k)
    if not texts:
        return np.array(vectors, dtype=np.float32, copy=True)
    kept, e, refused = embed_isolating(lambda idx: embedder.embed_queries(texts=[texts[i] for i in idx]),
                                       len(texts), embedder.dim)
    for i, exc in refused.items():
        row = rows[owners[i]]
        log.warning("line %d (%s): other title %r left out: %s", row.line, row.id, texts[i][:40], exc)
    return mix_in(vectors, [owners[i] for i in kept], e, ALT_TITLE_WEIGHT)


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
    if not shots:
        return np.array(photo_vectors, dtype=np.float32, copy=True)
    return mix_in(photo_vectors, np.repeat(owners, views), embedder.embed_queries(images=shots))


@dataclass(frozen=True)
class ItemViews:
    """What an index's ingestion adds to each item's served vectors: ``photo_views`` re-shots
    averaged into the photo-side vector, the other titles mixed into the searched one."""

    photo_views: int = 0
    alt_titles: bool = False


def _embed_rows(embedder: Embedder, rows: list[CatalogRow], bad: list[BadRow], width: int,
                views: ItemViews = ItemViews()) -> tuple[list[CatalogRow], np.ndarray]:
    """Embed rows (``width`` columns each: the item vector, and the photo-side vector when
    twice the embedding width), with ``views`` mixed in; isolate rows the server refuses (one
    request each)."""
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
    d = embedder.dim
    if photo and views.photo_views and kept:
        vectors[:, d:] = with_photo_views(embedder, [ok_rows[i] for i in kept], [photos[i] for i in kept],
                                          vectors[:, d:], views.photo_views)
    if views.alt_titles and kept:
        vectors[:, :d] = with_alt_titles(embedder, [ok_rows[i] for i in kept], vectors[:, :d])
    return [ok_rows[i] for i in kept], vectors


_QUEUED_PER_SLOT = 4  # requests queued per in-flight slot, ahead of the oldest unfinished one


def _embedded_chunks(embedder: Embedder, chunks: list[list[CatalogRow]], bad: list[BadRow],
                     request_rows: int, in_flight: int, width: int, views: ItemViews = ItemViews()
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
                    queued.append((nxt[0], pool.submit(_embed_rows, embedder, nxt[1], bad, width, views)))
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
                   alt_titles: bool | None = None,
                   progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Embed a catalogue through the item ensemble into the index at ``index_dir``.

    Chunks of ``chunk_size`` rows are added (and every ``save_every`` chunks saved) in
    catalogue order; the rows go to the server in requests of ``request_rows``, ``in_flight``
    of them at a time, in one stream across chunks.  ``photo_views`` re-shots of each photo
    are averaged into its photo-side vector (None: an existing index's setting, else 0); with
    ``alt_titles`` its other titles are mixed into its searched vector (None: likewise, else
    False)."""
    for name, value in (("chunk_size", chunk_size), ("save_every", save_every),
                        ("request_rows", request_rows), ("in_flight", in_flight)):
        if value < 1:
            raise InputError(f"ingest: {name} must be at least 1, got {value}")
    if photo_views is not None:
        check_photo_views(photo_views, None, "ingest")
    if alt_titles is not None:
        check_alt_titles(alt_titles, "ingest")
    t0 = time.time()
    embedder.check_ready()
    rows, bad = read_catalog(Path(catalog))
    index_dir = parse_location(index_dir)
    report = IngestReport(index_dir, rows=len(rows) + len(bad), bad=list(bad))
    index = open_or_create(index_dir, embedder, factory, resume, add, gpu, photo_views, alt_titles)
    # Photo views are nonzero only where the index keeps photo-side vectors (create).
    views = ItemViews(index.photo_views, index.alt_titles)
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
