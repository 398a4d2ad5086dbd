"""The on-disk catalogue index: FAISS vectors plus a SQLite metadata store.

One index lives in a directory ``INDEX_DIR``::

    INDEX_DIR/
      manifest.json          what the index is (dim, factory, fingerprint, generation, ...)
      catalog.sqlite         items, attributes, id map, tombstones, photo-side vectors, and
                             the commit record
      vectors.<G>.faiss      the FAISS index of generation G (exactly one after a clean save)
      .writer.lock           flock held by the one process that may modify the index

Vectors
    Items and queries are embedded into an L2-normalised space and compared by inner
    product (= cosine).  Vectors handed to :meth:`CatalogIndex.add` and
    :meth:`CatalogIndex.search` must already have unit norm (within
    :data:`NORM_TOLERANCE`): a vector far from unit norm almost always means the wrong
    output tensor or an unnormalised model, and normalising it silently would hide that.
    Within the tolerance they are renormalised exactly (fp16 engines drift by ~1e-3).
    Pass ``normalize=True`` to accept arbitrary non-zero vectors.  Shapes, dtypes and
    finiteness are checked here, because FAISS' Python wrappers only ``assert``.

Photo-side vectors
    An index created with ``photo_vectors=True`` also keeps a second vector per item (the
    item ensemble's ``PHOTO_EMBEDDING``) in the ``photo_vectors(label, vector)`` table, in
    the same SQLite transaction as the item's row, so it is saved, rolled back and deleted
    with it.  :meth:`CatalogIndex.search_photo` takes a photo query's first
    :data:`PHOTO_RERANK_DEPTH` candidates from FAISS and ranks them again by those vectors.

Labels
    Every item gets an int64 *label*, allocated monotonically and never reused.  IVF
    indexes store labels natively (``add_with_ids``); every other factory is wrapped in
    ``IndexIDMap2``.  (``IndexIDMap2`` over IVF is avoided on purpose: IVF's
    ``remove_ids`` does not renumber, so the wrapper's id map goes out of step.)

Deletion
    Flat-code indexes (Flat, SQ, PQ, ...) and IVF indexes remove vectors with
    ``remove_ids``.  Graph indexes (HNSW, NSG) and anything else that cannot remove keep
    the vector in FAISS and record the label in the ``tombstones`` table; searches then
    exclude tombstones through an ID selector (``IDSelectorNot``), never by
    post-filtering.  Tombstones cost memory and a little graph-search recall until the
    index is rebuilt.

Filters
    Attribute values are stored as text in ``attributes(label, field, value)`` (indexed on
    ``(field, value, label)``).  A filter ``{field: value | [values]}`` ANDs the fields and
    ORs the values of one field; the matching labels become a FAISS ID selector passed in
    the search parameters, so FAISS only ever scores admissible items.  When an
    approximate index still returns fewer than ``min(k, matches)`` results for a query
    (an IVF whose probed lists hold too few matches, an HNSW graph walk that meets too
    few), that query is searched again exhaustively: IVF with ``nprobe = nlist``, other
    indexes by an exact scan of the admissible vectors (``reconstruct``).  So k results
    come back whenever at least k items match.

Crash safety (the part that must be right)
    SQLite is the commit record.  Between saves, every change to the catalogue is held in
    one open SQLite write transaction and in the in-memory FAISS index; nothing on disk
    changes.  :meth:`CatalogIndex.save` then does, in this order:

    1. write the FAISS index of generation G+1 to ``vectors.<G+1>.faiss.tmp``, fsync it,
       ``os.replace`` it to ``vectors.<G+1>.faiss``, fsync the directory;
    2. set ``generation = G+1`` in SQLite's ``meta`` table and COMMIT (WAL,
       ``synchronous=FULL``) -- **this is the commit point**;
    3. write ``manifest.json`` (tmp file, fsync, ``os.replace``);
    4. delete ``vectors.<G>.faiss``.

    Opening reads the generation from SQLite and loads exactly that FAISS file, so the
    vectors and the rows always come from the same save:

    * crash before 2: SQLite still says G, its transaction is rolled back, and
      ``vectors.<G>.faiss`` is untouched: the previous index, whole.  A stray
      ``vectors.<G+1>.faiss`` or ``.tmp`` is ignored (and removed by the next writer);
    * crash between 2 and 3: SQLite says G+1 and ``vectors.<G+1>.faiss`` is already
      durable (step 1 finished before the commit); the manifest, one generation behind,
      is rewritten on the next writable open (roll forward);
    * crash after 3: only an old FAISS file is left over; it is removed on open.

    On open the FAISS vector count is checked against the live rows plus tombstones, and
    :meth:`CatalogIndex.verify` compares the label sets themselves.

Concurrency
    A process modifies an index only while holding ``.writer.lock`` (``flock``); any number
    of read-only openers (``read_only=True`` or ``mmap=True``) read the last committed
    generation (SQLite WAL readers do not block on the writer).  Inside one process, a
    readers-writer lock lets searches run concurrently (FAISS CPU indexes allow concurrent
    reads) while add/delete/train/save run alone (FAISS needs mutual exclusion for
    writes, and a search must not run while an add reallocates the codes).  GPU indexes are
    not thread-safe even for reads: GPU searches are serialised by their own lock.

GPU
    :meth:`CatalogIndex.to_gpu` (or ``gpu=True``) keeps the CPU index as the master copy
    (it is what ``save()`` writes and what filtered searches use, since FAISS GPU indexes
    take no ID selectors) and clones it to all visible GPUs with
    ``faiss.index_cpu_to_all_gpus`` for unfiltered searches; the clone is refreshed lazily
    after writes.  Training runs on the GPU when one is in use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from xmsearch.errors import IndexStoreError, InputError
from xmsearch.fsutil import fsync_dir, fsync_path, write_atomic

try:  # POSIX only; without it two writers are not excluded (logged on open).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CatalogIndex",
    "Hit",
    "check_additions",
    "check_embeddings",
    "FORMAT_VERSION",
    "NORM_TOLERANCE",
    "MANIFEST_NAME",
    "CATALOG_NAME",
    "PHOTO_RERANK_DEPTH",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CATALOG_NAME = "catalog.sqlite"
LOCK_NAME = ".writer.lock"
NORM_TOLERANCE = 1e-2
# FAISS warns below 39 training points per centroid; fewer gives visibly worse clusters.
POINTS_PER_CENTROID = 39
# Reserved metadata keys stored in their own columns; every other key is an attribute.
TITLE_KEY = "title"
IMAGE_KEY = "image"
# One encoder reused: json.dumps builds a new one per call when given options.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_SQL_CHUNK = 500  # stay far below SQLite's bound-parameter limit
_RECONSTRUCT_CHUNK = 16384

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    label INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    title TEXT,
    image TEXT,
    attributes TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS attributes (
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    label INTEGER NOT NULL,
    PRIMARY KEY (field, value, label)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS attributes_by_label ON attributes (label);
CREATE TABLE IF NOT EXISTS tombstones (label INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS photo_vectors (label INTEGER PRIMARY KEY, vector BLOB NOT NULL);
"""
# Candidates a photo query takes from FAISS before they are ranked again by the items'
# photo-side vectors (search_photo). Photo queries of the demo find their product within the
# first 10 of the main vectors; 50 leaves room for look-alikes (same figures as ranking all).
PHOTO_RERANK_DEPTH = 50


@dataclass(frozen=True)
class Hit:
    """One search result: the item's catalogue id, its cosine score, label and metadata."""

    id: str
    score: float
    label: int
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def check_embeddings(vectors: Any, dim: int, *, what: str = "vectors",
                     normalize: bool = False) -> np.ndarray:
    """Return ``vectors`` as a C-contiguous float32 [n, dim] array of unit rows.

    Raises InputError for a non-numeric dtype, a shape other than [n, dim], non-finite
    values, zero vectors, or (unless ``normalize``) norms farther than
    :data:`NORM_TOLERANCE` from 1.
    """
    try:
        arr = np.asarray(vectors)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: cannot be read as a numeric array ({exc}); "
                         f"pass a float32 numpy array of shape [n, {dim}]") from exc
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{what}: dtype {arr.dtype} is not a real number type; "
                         f"pass a float32 numpy array of shape [n, {dim}]")
    if arr.ndim != 2:
        hint = " (one vector? wrap it as v[None, :])" if arr.ndim == 1 else ""
        raise InputError(f"{what}: expected a 2-D array [n, {dim}], got shape "
                         f"{tuple(arr.shape)}{hint}")
    if arr.shape[1] != dim:
        raise InputError(f"{what}: dimension {arr.shape[1]} does not match the index "
                         f"dimension {dim}; were they embedded by another model?")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.shape[0] == 0:
        return arr
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise InputError(f"{what}: rows {_preview(rows.tolist())} contain NaN or inf "
                         "(or overflow float32); fix the embedding step")
    norms = np.linalg.norm(arr.astype(np.float64), axis=1)
    zero = norms == 0
    if zero.any():
        raise InputError(f"{what}: rows {_preview(np.flatnonzero(zero).tolist())} are zero "
                         "vectors and have no direction; fix the embedding step")
    if not normalize:
        off = np.abs(norms - 1.0) > NORM_TOLERANCE
        if off.any():
            rows = np.flatnonzero(off)
            raise InputError(
                f"{what}: rows {_preview(rows.tolist())} have L2 norms "
                f"{_preview([round(float(n), 4) for n in norms[rows]])}, expected 1 "
                f"(+-{NORM_TOLERANCE}); the index compares L2-normalised embeddings by "
                "inner product. Check you pass the EMBEDDING output, or use normalize=True")
    return np.ascontiguousarray(arr / norms[:, None].astype(np.float32))


def _preview(values: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:limit])
    more = len(values) - limit
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _check_ids(ids: Any, what: str) -> list[str]:
    if isinstance(ids, (str, bytes)):
        raise InputError(f"{what}: ids must be a list of strings, got one string {ids!r}; "
                         "wrap it in a list")
    try:
        out = list(ids)
    except TypeError as exc:
        raise InputError(f"{what}: ids must be a list of strings, got "
                         f"{type(ids).__name__}") from exc
    bad = [i for i, v in enumerate(out) if not isinstance(v, str) or not v]
    if bad:
        raise InputError(f"{what}: ids at positions {_preview(bad)} are not non-empty "
                         f"strings ({_preview([out[i] for i in bad[:10]])})")
    return [str(v) for v in out]


def _attribute_text(value: Any) -> str | None:
    """The text form under which an attribute value is indexed and matched."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        return repr(float(value))
    return None


def _item_row(item_id: str, meta: Any) -> tuple[str | None, str | None, dict[str, Any],
                                                  list[tuple[str, str]]]:
    """Split one metadata dict into title, image, attributes and indexed (field, value)."""
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise InputError(f"add(): metadata for id {item_id!r} must be a dict, got "
                         f"{type(meta).__name__}")
    title = meta.get(TITLE_KEY)
    image = meta.get(IMAGE_KEY)
    for key, val in ((TITLE_KEY, title), (IMAGE_KEY, image)):
        if val is not None and not isinstance(val, str):
            raise InputError(f"add(): metadata {key!r} of id {item_id!r} must be a string, "
                             f"got {type(val).__name__}")
    if "id" in meta and meta["id"] != item_id:
        raise InputError(f"add(): metadata of id {item_id!r} carries a different id "
                         f"{meta['id']!r}; drop it or make them agree")
    attrs = {k: v for k, v in meta.items() if k not in (TITLE_KEY, IMAGE_KEY, "id")}
    pairs: list[tuple[str, str]] = []
    for key, val in attrs.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"add(): metadata of id {item_id!r} has a non-string or "
                             f"empty key {key!r}")
        values = val if isinstance(val, (list, tuple)) else [val]
        for v in values:
            text = _attribute_text(v)
            if text is not None:
                pairs.append((key, text))
    return title, image, attrs, pairs


MAX_PHOTO_VIEWS = 16


def check_photo_views(photo_views: Any, photo_vectors: bool | None, where: str = "create()") -> None:
    """A ``photo_views`` setting: 0, or up to MAX_PHOTO_VIEWS where the index keeps photo-side
    vectors (``photo_vectors``; None: not known yet)."""
    if isinstance(photo_views, bool) or not isinstance(photo_views, (int, np.integer)) \
            or not 0 <= photo_views <= MAX_PHOTO_VIEWS:
        raise InputError(f"{where}: photo_views must be an integer from 0 to {MAX_PHOTO_VIEWS}, "
                         f"got {photo_views!r}")
    if photo_views and photo_vectors is False:
        raise InputError(f"{where}: photo_views={photo_views} averages re-shots into photo-side "
                         "vectors, and this index keeps none (photo_vectors=False)")


def check_alt_titles(alt_titles: Any, where: str = "create()") -> None:
    """An ``alt_titles`` setting: True or False (whether ingestion mixes each item's other
    titles into its vector)."""
    if not isinstance(alt_titles, bool):
        raise InputError(f"{where}: alt_titles must be True or False, got {alt_titles!r}")


def check_additions(ids: Any, vectors: Any, metadata: Any, photo_vectors: Any, *, dim: int,
                    keeps_photo: bool, where: object, normalize: bool = False
                    ) -> tuple[list[str], np.ndarray, np.ndarray | None, list[Any]]:
    """``add()``'s arguments checked against each other and an index of ``dim``-d vectors
    that keeps (``keeps_photo``) or does not keep photo-side vectors: ``(ids, vectors,
    photo vectors or None, metadata entries)``, or an InputError naming the index ``where``."""
    ids = _check_ids(ids, "add()")
    x = check_embeddings(vectors, dim, what="add(): vectors", normalize=normalize)
    if len(x) != len(ids):
        raise InputError(f"add(): {len(ids)} ids but {len(x)} vectors; pass one vector per id")
    if keeps_photo and photo_vectors is None:
        raise InputError(f"add(): index {where} keeps a photo-side vector per item; "
                         "pass photo_vectors (one per id)")
    if not keeps_photo and photo_vectors is not None:
        raise InputError(f"add(): index {where} was created without photo-side vectors "
                         "(photo_vectors=False); add the items without them")
    photo = None
    if photo_vectors is not None:
        photo = check_embeddings(photo_vectors, dim, what="add(): photo_vectors", normalize=normalize)
        if len(photo) != len(ids):
            raise InputError(f"add(): {len(ids)} ids but {len(photo)} photo vectors; pass one per id")
    metas = [None] * len(ids) if metadata is None else list(metadata)
    if len(metas) != len(ids):
        raise InputError(f"add(): {len(ids)} ids but {len(metas)} metadata entries")
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise InputError(f"add(): ids {_preview(repeated)} appear more than once in this "
                         "call; each id names one item")
    return ids, x, photo, metas


def check_k(k: Any, step: str = "search()", name: str = "k") -> int:
    """``k`` as an int, or an InputError naming ``step`` and the argument ``name``: a
    search's result count (or candidate count) must be a positive integer."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"{step}: {name} must be a positive integer, got {k!r}")
    return int(k)


def filter_values(field_name: Any, values: Any) -> list[str]:
    """One filter clause's values as the index matches them (text forms), or an InputError."""
    if not isinstance(field_name, str) or not field_name:
        raise InputError(f"search(): filter field {field_name!r} must be a non-empty string")
    seq = list(values) if isinstance(values, (list, tuple, set, frozenset)) else [values]
    if not seq:
        raise InputError(f"search(): filter field {field_name!r} has an empty value list; "
                         "give at least one value or drop the field")
    out = []
    for v in seq:
        text = _attribute_text(v)
        if text is None:
            raise InputError(f"search(): filter value {v!r} for field {field_name!r} must be "
                             "a string (or a number/bool, matched by its text form)")
        out.append(text)
    return out


# --------------------------------------------------------------------------- files




def _faiss_name(generation: int) -> str:
    return f"vectors.{generation}.faiss"


# --------------------------------------------------------------------------- locks


@contextmanager
def _omp_threads_at_most(n: int) -> Iterator[None]:
    """FAISS's OpenMP threads, in the calling thread, limited to ``n`` for one call.

    A search of fewer queries than threads gains nothing from the extra ones, and idle
    OpenMP threads spin before they sleep (libgomp's default wait policy): a single-query
    search then burnt about 4 ms of CPU on a second core, three times the rest of the client's
    work per query, taken from the server on a shared machine (benchmarks/results/NOTES.md).
    ``omp_set_num_threads`` applies to the calling thread only, so concurrent searches do
    not see each other's limit.
    """
    before = faiss.omp_get_max_threads()
    if n >= before:
        yield
        return
    faiss.omp_set_num_threads(max(1, n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class _ReadWriteLock:
    """Many readers or one writer; waiting writers block new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# --------------------------------------------------------------------------- faiss helpers


def _downcast(index: Any) -> Any:
    return faiss.downcast_index(index) if index is not None else None


def _unwrap(index: Any) -> Any:
    """The index under IDMap / PreTransform wrappers."""
    index = _downcast(index)
    while True:
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            index = _downcast(index.index)
        elif isinstance(index, faiss.IndexPreTransform):
            index = _downcast(index.index)
        else:
            return index


def _ivf_of(index: Any) -> Any:
    return faiss.try_extract_index_ivf(index)


def _hnsw_of(index: Any) -> Any:
    base = _unwrap(index)
    return base if isinstance(base, faiss.IndexHNSW) else None


def _ivf_quantizer_hnsw(index: Any) -> Any:
    ivf = _ivf_of(index)
    if ivf is None:
        return None
    quantizer = _downcast(ivf.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def _layout(index: Any) -> tuple[str, str]:
    """(id_mode, removal) for a freshly built factory index."""
    base = _unwrap(index)
    if isinstance(base, faiss.IndexIVF):
        return "native", "remove"
    if isinstance(base, faiss.IndexFlatCodes):
        return "idmap", "remove"
    return "idmap", "tombstone"


def _training_sizes(index: Any) -> tuple[int, int]:
    """(minimum, recommended) number of training vectors for an untrained index."""
    clusters = 1
    ivf = _ivf_of(index)
    if ivf is not None:
        clusters = max(clusters, int(ivf.nlist))
    base = _unwrap(index)
    pq = getattr(base, "pq", None)
    if pq is not None and hasattr(pq, "ksub"):
        clusters = max(clusters, int(pq.ksub))
    if clusters == 1:
        return 1, 1
    return clusters, POINTS_PER_CENTROID * clusters


_NO_GPU_MESSAGE = (
    "faiss-gpu with a visible GPU is needed for a GPU index; this faiss {version} "
    "{reason}. Install the gpu extra (pip install 'xmsearch[gpu]') on a machine with an "
    "NVIDIA GPU, or search on CPU")


def _require_gpu() -> None:
    if not hasattr(faiss, "StandardGpuResources"):
        reason = "is a CPU-only build"
    elif faiss.get_num_gpus() == 0:
        reason = "sees no GPU (check CUDA_VISIBLE_DEVICES and the driver)"
    else:
        return
    raise IndexStoreError(_NO_GPU_MESSAGE.format(version=faiss.__version__, reason=reason))


# --------------------------------------------------------------------------- the index


class CatalogIndex:
    """FAISS index + SQLite metadata store of a product catalogue in one directory.

    Build one with :meth:`create`, load one with :meth:`open`.  Changes are in memory
    until :meth:`save`; ``with CatalogIndex.open(...) as idx:`` saves on a clean exit and
    discards unsaved changes when the block raises.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, index: Any, meta: dict[str, Any],
                 *, read_only: bool, lock_fd: int | None) -> None:
        # Private: use create() or open().
        self._path = path
        self._conn = conn
        self._index = index
        self._read_only = read_only
        self._lock_fd = lock_fd
        self._dim = int(meta["dim"])
        self._factory = str(meta["factory"])
        self._metric = str(meta["metric"])
        self._fingerprint = str(meta["fingerprint"])
        self._generation = int(meta["generation"])
        self._next_label = int(meta["next_label"])
        self._id_mode = str(meta["id_mode"])
        self._removal = str(meta["removal"])
        self._search_params: dict[str, int] = dict(meta.get("search_params") or {})
        # Indexes created before photo-side vectors existed have neither the key nor the table.
        self._photo = bool(meta.get("photo_vectors", False))
        # Re-shots averaged into each photo-side vector at ingestion (``ingest_catalog``);
        # indexes created before the setting existed used none.
        self._photo_views = int(meta.get("photo_views", 0))
        # Whether ingestion mixes each item's other titles into its vector (``ingest_catalog``).
        self._alt_titles = bool(meta.get("alt_titles", False))
        # Whether the factory trains at all (Flat/HNSW do not), independent of its state.
        self._factory_trains = not faiss.index_factory(
            self._dim, self._factory, faiss.METRIC_INNER_PRODUCT).is_trained
        self._count = self._scalar("SELECT COUNT(*) FROM items")
        self._tombstones = np.fromiter(
            (r[0] for r in conn.execute("SELECT label FROM tombstones ORDER BY label")),
            dtype=np.int64)
        self._rw = _ReadWriteLock()
        self._db_lock = threading.Lock()
        self._gpu_lock = threading.Lock()
        self._gpu_index: Any = None
        self._gpu_wanted = False
        self._gpu_stale = False
        self._in_txn = False
        self._dirty = False
        self._closed = False
        self._apply_search_params(self._index, self._search_params)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, path: str | os.PathLike[str], dim: int, *, fingerprint: str,
               factory: str = "Flat", metric: str = "ip", gpu: bool = False,
               photo_vectors: bool = False, photo_views: int = 0, alt_titles: bool = False) -> CatalogIndex:
        """Create an empty index in directory ``path`` (created if missing) and save it.

        ``factory`` is any FAISS ``index_factory`` string without an ``IDMap`` prefix
        (labels are managed here), e.g. ``"Flat"``, ``"IVF256,Flat"``, ``"IVF4096,PQ32"``,
        ``"HNSW32"``.  ``fingerprint`` identifies the model that embeds the vectors.
        Only ``metric="ip"`` (inner product on unit vectors, i.e. cosine) is supported.
        ``photo_vectors``: every item also keeps a photo-side vector (the item ensemble's
        ``PHOTO_EMBEDDING``), stored beside its metadata, by which :meth:`search_photo`
        ranks a photo query's candidates again; :meth:`add` then requires them.
        ``photo_views``: how many re-shots of each photo its ingestion averages into the
        photo-side vector, recorded so that resumed and later ingests do the same;
        ``alt_titles``: whether its ingestion mixes each item's other titles into its vector,
        recorded likewise.
        """
        root = Path(path)
        check_alt_titles(alt_titles)
        check_photo_views(photo_views, photo_vectors)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise InputError(f"create(): dim must be a positive integer, got {dim!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise InputError("create(): fingerprint must be the non-empty model fingerprint "
                             "of the server that embeds the catalogue")
        if metric not in ("ip", "cosine"):
            raise InputError(f"create(): metric {metric!r} is not supported; use 'ip' "
                             "(vectors are L2-normalised, so inner product is cosine)")
        if not isinstance(factory, str) or not factory.strip():
            raise InputError(f"create(): factory must be a FAISS index_factory string, "
                             f"got {factory!r}")
        factory = factory.strip()
        if factory.upper().startswith("IDMAP"):
            raise InputError(f"create(): factory {factory!r}: drop the IDMap prefix; the "
                             "catalogue index maps ids itself")
        try:
            index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise InputError(f"create(): FAISS cannot build factory {factory!r} for dim "
                             f"{dim}: {_faiss_reason(exc)}") from exc
        if gpu:
            _require_gpu()
        id_mode, removal = _layout(index)
        if id_mode == "idmap":
            index = faiss.IndexIDMap2(index)

        if root.exists() and not root.is_dir():
            raise IndexStoreError(f"create(): {root} exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        taken = [p.name for p in root.iterdir()
                 if p.name in (MANIFEST_NAME, CATALOG_NAME) or p.name.endswith(".faiss")]
        if taken:
            raise IndexStoreError(f"create(): {root} already holds an index ({', '.join(taken)}); "
                                  "open it with CatalogIndex.open, or remove the directory "
                                  "to start over")
        lock_fd = _acquire_writer_lock(root)
        try:
            conn = _connect(root / CATALOG_NAME, read_only=False)
            now = time.time()
            meta = {"format_version": FORMAT_VERSION, "dim": int(dim), "factory": factory,
                    "metric": "ip", "fingerprint": fingerprint, "generation": 0,
                    "next_label": 0, "id_mode": id_mode, "removal": removal,
                    "search_params": {}, "created_at": now, "photo_vectors": bool(photo_vectors),
                    "photo_views": int(photo_views), "alt_titles": alt_titles}
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA)
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in meta.items()])
            self = cls(root, conn, index, meta, read_only=False, lock_fd=lock_fd)
            self._in_txn = True
            self._dirty = True
            self.save()
        except BaseException:
            _release_writer_lock(lock_fd)
            raise
        if gpu:
            self.to_gpu()
        logger.info("created index %s (dim %d, factory %s)", root, dim, factory)
        return self

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, mmap: bool = False, read_only: bool = False,
             gpu: bool = False) -> CatalogIndex:
        """Open an index directory.

        ``read_only=True`` takes no writer lock (many searchers may open the index while
        one writer ingests).  ``mmap=True`` maps the FAISS data instead of reading it
        (``IO_FLAG_MMAP | IO_FLAG_READ_ONLY``) and implies ``read_only``.  A writable open
        excludes other writers and finishes an interrupted save (see module docstring).
        """
        root = Path(path)
        read_only = read_only or mmap
        if not root.exists():
            raise IndexStoreError(f"open(): index directory {root} does not exist; create it "
                                  "with `xmsearch index` or check the path")
        if not root.is_dir():
            raise IndexStoreError(f"open(): {root} is not a directory")
        lock_fd = None if read_only else _acquire_writer_lock(root)
        try:
            self = cls._load(root, mmap=mmap, read_only=read_only, lock_fd=lock_fd)
        except BaseException:
            _release_writer_lock(lock_fd)
            raise
        if gpu:
            self.to_gpu()
        return self

    @classmethod
    def _load(cls, root: Path, *, mmap: bool, read_only: bool,
              lock_fd: int | None) -> CatalogIndex:
        manifest_path = root / MANIFEST_NAME
        catalog_path = root / CATALOG_NAME
        if not catalog_path.exists():
            raise IndexStoreError(f"open(): {catalog_path} is missing: {root} is not a "
                                  "catalogue index (or it was only partly copied)")
        if not manifest_path.exists():
            raise IndexStoreError(f"open(): {manifest_path} is missing: {root} is not a "
                                  "catalogue index (or it was only partly copied)")
        conn = _connect(catalog_path, read_only=read_only)
        try:
            # A reader racing a writer's save can see a generation whose file was just
            # replaced by the next one; reading again picks up the newer generation.
            for attempt in range(3):
                manifest = _read_manifest(manifest_path)
                meta = _read_meta(conn, catalog_path)
                _check_manifest(manifest, meta, manifest_path, catalog_path)
                faiss_path = root / _faiss_name(int(meta["generation"]))
                if faiss_path.exists() or not read_only or attempt == 2:
                    break
                time.sleep(0.05)
            index = _read_faiss(faiss_path, mmap=mmap, ivf=meta["id_mode"] == "native")
            _check_faiss(index, meta, faiss_path, manifest_path)
            self = cls(root, conn, index, meta, read_only=read_only, lock_fd=lock_fd)
        except BaseException:
            conn.close()
            raise
        expected = self._count + len(self._tombstones)
        if self._index.ntotal != expected:
            self._conn.close()
            raise IndexStoreError(
                f"open(): {faiss_path} holds {self._index.ntotal} vectors but {catalog_path} "
                f"lists {self._count} items and {len(self._tombstones)} tombstones at "
                f"generation {self._generation}: the two files do not belong together; "
                "restore both from the same backup or re-index")
        if int(manifest["generation"]) != self._generation:
            logger.info("index %s: manifest is at generation %s, catalog at %d (a save was "
                        "interrupted after its commit); rolling forward", root,
                        manifest["generation"], self._generation)
            if not read_only:
                self._write_manifest()
        if not read_only:
            self._remove_stale_files()
        return self

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        """The index directory."""
        return self._path

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._dim

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the model whose embeddings this index holds."""
        return self._fingerprint

    @property
    def factory(self) -> str:
        """The FAISS index_factory string the index was built from."""
        return self._factory

    @property
    def metric(self) -> str:
        """Always ``"ip"`` (inner product on L2-normalised vectors)."""
        return self._metric

    @property
    def generation(self) -> int:
        """The generation of the last committed save."""
        return self._generation

    @property
    def read_only(self) -> bool:
        """True when opened with ``read_only=True`` or ``mmap=True``."""
        return self._read_only

    @property
    def dirty(self) -> bool:
        """True when there are changes that ``save()`` has not committed yet."""
        return self._dirty

    @property
    def needs_training(self) -> bool:
        """True while the factory needs training (IVF, PQ, SQ ...) and has not had it."""
        return not self._index.is_trained

    @property
    def training_size(self) -> tuple[int, int]:
        """(minimum, recommended) number of vectors to train this factory on."""
        return _training_sizes(self._index)

    @property
    def search_params(self) -> dict[str, int]:
        """Persistent search-time knobs (``nprobe``, ``efSearch``) set so far."""
        return dict(self._search_params)

    @property
    def has_photo_vectors(self) -> bool:
        """Whether every item keeps a photo-side vector (see :meth:`create`)."""
        return self._photo

    @property
    def photo_views(self) -> int:
        """Re-shots averaged into each photo-side vector at ingestion (see :meth:`create`)."""
        return self._photo_views

    @property
    def alt_titles(self) -> bool:
        """Whether ingestion mixes each item's other titles into its vector (see :meth:`create`)."""
        return self._alt_titles

    @property
    def tombstone_count(self) -> int:
        """Deleted items whose vectors stay in a graph index (HNSW) but are never returned."""
        return len(self._tombstones)

    @property
    def on_gpu(self) -> bool:
        """True when unfiltered searches run on a GPU clone."""
        return self._gpu_wanted

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"CatalogIndex({str(self._path)!r}, dim={self._dim}, factory={self._factory!r}, "
                f"items={self._count}, generation={self._generation}"
                f"{', read_only' if self._read_only else ''})")

    # ------------------------------------------------------------------ checks

    def check_fingerprint(self, served: str) -> None:
        """Raise IndexStoreError unless ``served`` equals the index's model fingerprint."""
        if served != self._fingerprint:
            raise IndexStoreError(
                f"index {self._path} was embedded by model fingerprint {self._fingerprint}, "
                f"server has {served}: vectors of two models are meaningless together; "
                "re-index or point at the right server")

    def verify(self) -> None:
        """Check that FAISS holds exactly the labels SQLite lists (live + tombstones).

        O(n); raises IndexStoreError naming the files and a few disagreeing labels.
        """
        with self._rw.read(), self._db_lock:
            self._require_open("verify()")
            stored = np.fromiter((r[0] for r in self._conn.execute(
                "SELECT label FROM items UNION ALL SELECT label FROM tombstones")),
                dtype=np.int64)
            in_faiss = self._faiss_labels()
            if self._photo:
                live = np.fromiter((r[0] for r in self._conn.execute("SELECT label FROM items")), dtype=np.int64)
                with_photo = np.fromiter((r[0] for r in self._conn.execute(
                    "SELECT label FROM photo_vectors")), dtype=np.int64)
        stored.sort()
        in_faiss.sort()
        if not np.array_equal(stored, in_faiss):
            only_sql = np.setdiff1d(stored, in_faiss)[:10].tolist()
            only_faiss = np.setdiff1d(in_faiss, stored)[:10].tolist()
            raise IndexStoreError(
                f"verify(): {self._path / _faiss_name(self._generation)} and "
                f"{self._path / CATALOG_NAME} disagree: labels only in SQLite {only_sql}, "
                f"only in FAISS {only_faiss}; re-index")
        if self._photo and not np.array_equal(np.sort(live), np.sort(with_photo)):
            raise IndexStoreError(
                f"verify(): in {self._path / CATALOG_NAME}, items without a photo-side vector "
                f"{np.setdiff1d(live, with_photo)[:10].tolist()}, photo-side vectors of no item "
                f"{np.setdiff1d(with_photo, live)[:10].tolist()}; re-index")

    def _faiss_labels(self) -> np.ndarray:
        if self._id_mode == "idmap":
            return faiss.vector_to_array(faiss.downcast_index(self._index).id_map).astype(np.int64)
        ivf = _ivf_of(self._index)
        invlists = ivf.invlists
        parts = []
        for list_no in range(ivf.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(list_no, ptr)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ writes

    def train(self, sample: np.ndarray, *, normalize: bool = False) -> None:
        """Train an untrained factory (IVF/PQ/SQ) on a representative sample of vectors.

        A no-op for factories that need no training.  Raises InputError when the sample
        is smaller than :attr:`training_size`'s minimum, or when the index is already
        trained (re-training would orphan the stored vectors).
        """
        x = check_embeddings(sample, self._dim, what="train(): sample", normalize=normalize)
        with self._rw.write():
            self._require_writable("train()")
            self._train_locked(x, "train()")

    def _train_locked(self, x: np.ndarray, step: str) -> None:
        if not self._factory_trains:
            logger.debug("%s: factory %s needs no training", step, self._factory)
            return
        if self._index.is_trained:
            raise InputError(f"{step}: index {self._path} is already trained; create a new "
                             "index to train again")
        minimum, recommended = _training_sizes(self._index)
        if len(x) < minimum:
            raise InputError(
                f"{step}: factory {self._factory} needs at least {minimum} training vectors "
                f"(FAISS recommends {recommended}); got {len(x)}. Train on a larger sample, "
                "or choose a factory with fewer lists (e.g. 'Flat' below ~100k items)")
        if len(x) < recommended:
            logger.warning("%s: training %s on %d vectors; FAISS recommends %d (%d per "
                           "centroid): recall may suffer", step, self._factory, len(x),
                           recommended, POINTS_PER_CENTROID)
        try:
            if self._gpu_wanted and _ivf_of(self._index) is not None:
                self._train_on_gpu(x)
            else:
                self._index.train(x)
        except RuntimeError as exc:
            raise InputError(f"{step}: FAISS could not train {self._factory} on {len(x)} "
                             f"vectors: {_faiss_reason(exc)}") from exc
        self._begin()
        self._dirty = True
        self._gpu_stale = True

    def _train_on_gpu(self, x: np.ndarray) -> None:
        # k-means is where a GPU pays off most; the trained index comes back to the CPU
        # master copy (empty, so the copy is cheap).
        gpu_index = faiss.index_cpu_to_all_gpus(self._index)
        gpu_index.train(x)
        trained = faiss.index_gpu_to_cpu(gpu_index)
        self._index = trained
        self._apply_search_params(self._index, self._search_params)

    def add(self, ids: Sequence[str], vectors: np.ndarray,
            metadata: Sequence[Mapping[str, Any] | None] | None = None, *,
            upsert: bool = False, normalize: bool = False,
            photo_vectors: np.ndarray | None = None) -> list[int]:
        """Add items; returns their labels.

        ``metadata[i]`` describes ``ids[i]``: keys ``title`` and ``image`` (path or URL)
        go to their own columns, every other key is a filterable attribute (string,
        number, bool, or a list of those).  Ids already in the index (or repeated in the
        call) raise InputError naming them, unless ``upsert=True`` replaces them.  An
        untrained factory is trained on these vectors when there are at least the
        recommended number (see :attr:`training_size`); otherwise InputError says how
        many are needed.  ``photo_vectors[i]`` is ``ids[i]``'s photo-side vector, required
        by an index created with ``photo_vectors=True`` and refused by others.  Changes are
        durable after :meth:`save`.
        """
        ids, x, photo, metas = check_additions(ids, vectors, metadata, photo_vectors, dim=self._dim,
                                               keeps_photo=self._photo, where=self._path,
                                               normalize=normalize)
        rows = []
        for item_id, meta in zip(ids, metas):
            title, image, attrs, pairs = _item_row(item_id, meta)
            try:
                attrs_json = _JSON.encode(attrs)
            except (TypeError, ValueError) as exc:
                raise InputError(f"add(): metadata of id {item_id!r} is not JSON-serialisable "
                                 f"({exc})") from exc
            rows.append((item_id, title, image, attrs_json, pairs))
        if not ids:
            return []

        with self._rw.write():
            self._require_writable("add()")
            existing = self._labels_of(ids)
            if existing and not upsert:
                raise InputError(f"add(): ids {_preview(sorted(existing))} are already in "
                                 f"index {self._path}; use upsert=True to replace them or "
                                 "delete them first")
            if not self._index.is_trained:
                minimum, recommended = _training_sizes(self._index)
                if len(x) < recommended:
                    raise InputError(
                        f"add(): factory {self._factory} must be trained before the first add "
                        f"and this call has only {len(x)} vectors (training needs at least "
                        f"{minimum}, FAISS recommends {recommended}). Call train(sample) with "
                        f"a representative sample of >= {minimum} vectors first, add at least "
                        f"{recommended} vectors in the first call, or use factory 'Flat' for "
                        "a small catalogue")
                self._train_locked(x, "add()")
            labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
            old = np.array(sorted(existing.values()), dtype=np.int64)
            self._begin()
            self._conn.execute("SAVEPOINT add_items")
            try:
                if len(old):
                    self._delete_rows(old)
                self._conn.executemany(
                    "INSERT INTO items (label, id, title, image, attributes) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(int(lb), r[0], r[1], r[2], r[3]) for lb, r in zip(labels, rows)])
                self._conn.executemany(
                    # OR IGNORE: a list attribute may repeat a value.
                    "INSERT OR IGNORE INTO attributes (field, value, label) VALUES (?, ?, ?)",
                    [(f, v, int(lb)) for lb, r in zip(labels, rows) for f, v in r[4]])
                if photo is not None:
                    self._conn.executemany(
                        "INSERT INTO photo_vectors (label, vector) VALUES (?, ?)",
                        [(int(lb), v.tobytes()) for lb, v in zip(labels, photo)])
                # FAISS last: if it refuses, the savepoint undoes the rows and nothing
                # else has changed yet.
                self._index.add_with_ids(x, labels)
            except BaseException:
                self._conn.execute("ROLLBACK TO add_items")
                self._conn.execute("RELEASE add_items")
                raise
            self._conn.execute("RELEASE add_items")
            self._next_label += len(ids)
            self._count += len(ids)
            if len(old):
                self._forget_vectors(old)
                self._count -= len(old)
            self._dirty = True
            self._gpu_stale = True
            return labels.tolist()

    def delete(self, ids: Sequence[str], *, missing_ok: bool = False) -> int:
        """Delete items by id; returns how many were deleted.

        Unknown ids raise InputError naming them unless ``missing_ok``.  Vectors leave
        FAISS (``remove_ids``) or, for graph indexes, become tombstones.
        """
        ids = _check_ids(ids, "delete()")
        with self._rw.write():
            self._require_writable("delete()")
            found = self._labels_of(ids)
            missing = sorted(set(ids) - set(found))
            if missing and not missing_ok:
                raise InputError(f"delete(): ids {_preview(missing)} are not in index "
                                 f"{self._path}; pass missing_ok=True to ignore them")
            if not found:
                return 0
            labels = np.array(sorted(found.values()), dtype=np.int64)
            self._begin()
            self._conn.execute("SAVEPOINT delete_items")
            try:
                self._delete_rows(labels)
            except BaseException:
                self._conn.execute("ROLLBACK TO delete_items")
                self._conn.execute("RELEASE delete_items")
                raise
            self._conn.execute("RELEASE delete_items")
            self._forget_vectors(labels)
            self._count -= len(labels)
            self._dirty = True
            self._gpu_stale = True
            return len(labels)

    def _delete_rows(self, labels: np.ndarray) -> None:
        values = [(int(lb),) for lb in labels]
        self._conn.executemany("DELETE FROM attributes WHERE label = ?", values)
        self._conn.executemany("DELETE FROM items WHERE label = ?", values)
        if self._photo:
            self._conn.executemany("DELETE FROM photo_vectors WHERE label = ?", values)
        if self._removal == "tombstone":
            self._conn.executemany("INSERT INTO tombstones (label) VALUES (?)", values)

    def _forget_vectors(self, labels: np.ndarray) -> None:
        if self._removal == "tombstone":
            self._tombstones = np.union1d(self._tombstones, labels)
            return
        removed = self._index.remove_ids(faiss.IDSelectorBatch(labels))
        if removed != len(labels):
            raise IndexStoreError(
                f"delete(): FAISS removed {removed} of {len(labels)} vectors from "
                f"{self._path}; the in-memory index disagrees with the catalogue. Close "
                "without saving and reopen")

    def set_search_params(self, *, nprobe: int | None = None,
                          efSearch: int | None = None) -> None:  # noqa: N803 - FAISS name
        """Set search-time knobs: ``nprobe`` (IVF lists scanned), ``efSearch`` (HNSW beam).

        They apply at once and are persisted in the manifest by the next :meth:`save`
        (for a read-only index, they last for this session only).
        """
        params = dict(self._search_params)
        if nprobe is not None:
            params["nprobe"] = self._valid_nprobe(nprobe)
        if efSearch is not None:
            params["efSearch"] = self._valid_ef(efSearch)
        with self._rw.write():
            self._search_params = params
            self._apply_search_params(self._index, params)
            if not self._read_only:
                self._dirty = True
            self._gpu_stale = True

    def _valid_nprobe(self, nprobe: Any) -> int:
        ivf = _ivf_of(self._index)
        if ivf is None:
            raise InputError(f"nprobe applies to IVF factories; index {self._path} is "
                             f"{self._factory}")
        if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
            raise InputError(f"nprobe must be a positive integer, got {nprobe!r}")
        return int(min(nprobe, ivf.nlist))

    def _valid_ef(self, ef: Any) -> int:
        if _hnsw_of(self._index) is None and _ivf_quantizer_hnsw(self._index) is None:
            raise InputError(f"efSearch applies to HNSW factories; index {self._path} is "
                             f"{self._factory}")
        if isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or ef < 1:
            raise InputError(f"efSearch must be a positive integer, got {ef!r}")
        return int(ef)

    @staticmethod
    def _apply_search_params(index: Any, params: Mapping[str, int]) -> None:
        # Also set on the index object so that a copy (GPU clone, a raw FAISS user) sees them;
        # searches here pass them explicitly anyway.
        space = faiss.ParameterSpace()
        for name in ("nprobe", "efSearch"):
            if name in params:
                try:
                    space.set_index_parameter(index, name, params[name])
                except RuntimeError:
                    logger.debug("parameter %s not applicable to %s", name, type(index))

    # ------------------------------------------------------------------ persistence

    def save(self) -> None:
        """Commit all changes atomically (see the module docstring for the protocol).

        A crash at any point leaves either the previous or the new generation fully
        usable.  Raises IndexStoreError when a file cannot be written; the in-memory index
        is then unchanged and ``save()`` may be retried.
        """
        with self._rw.write():
            self._require_writable("save()")
            if not self._dirty:
                return
            generation = self._generation + 1
            final = self._path / _faiss_name(generation)
            tmp = final.with_name(final.name + ".tmp")
            try:
                faiss.write_index(self._index, str(tmp))
                fsync_path(tmp)
                os.replace(tmp, final)
                fsync_dir(self._path)
            except (RuntimeError, OSError) as exc:
                _unlink_quietly(tmp)
                raise IndexStoreError(f"save(): could not write {final}: {_faiss_reason(exc)}; "
                                      "the previous generation is intact (disk full? "
                                      "permissions?)") from exc
            self._begin()
            meta = {"generation": generation, "next_label": self._next_label,
                    "search_params": self._search_params, "saved_at": time.time(),
                    "count": self._count}
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in meta.items()])
                self._conn.execute("COMMIT")  # the commit point
            except sqlite3.Error as exc:
                raise IndexStoreError(f"save(): could not commit {self._path / CATALOG_NAME}: "
                                      f"{exc}; the previous generation is intact") from exc
            self._in_txn = False
            self._dirty = False
            self._generation = generation
            try:
                self._write_manifest()
            except OSError as exc:
                # Committed already: the next writable open rewrites the manifest.
                logger.warning("save(): committed generation %d but could not write %s (%s); "
                               "it is rewritten on the next open", generation,
                               self._path / MANIFEST_NAME, exc)
            self._remove_stale_files()

    def _write_manifest(self) -> None:
        manifest = {
            "format_version": FORMAT_VERSION,
            "dim": self._dim,
            "metric": self._metric,
            "factory": self._factory,
            "fingerprint": self._fingerprint,
            "count": self._count,
            "tombstones": len(self._tombstones),
            "search_params": self._search_params,
            "generation": self._generation,
            "faiss_file": _faiss_name(self._generation),
            "faiss_version": faiss.__version__,
            "id_mode": self._id_mode,
            "removal": self._removal,
        }
        write_atomic(self._path / MANIFEST_NAME,
                      (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())

    def _remove_stale_files(self) -> None:
        keep = _faiss_name(self._generation)
        for entry in self._path.iterdir():
            name = entry.name
            stale_faiss = name.startswith("vectors.") and name.endswith(".faiss") and name != keep
            if stale_faiss or (name.endswith(".tmp") and (name.startswith("vectors.")
                                                         or name == MANIFEST_NAME + ".tmp")):
                _unlink_quietly(entry)

    def close(self) -> None:
        """Release the index; unsaved changes are discarded (logged when there are any)."""
        if self._closed:
            return
        with self._rw.write():
            if self._dirty and not self._read_only:
                logger.warning("index %s closed with unsaved changes; they are discarded "
                               "(call save() to keep them)", self._path)
            try:
                if self._in_txn:
                    self._conn.execute("ROLLBACK")
                self._conn.close()
            finally:
                self._in_txn = False
                self._closed = True
                self._gpu_index = None
                _release_writer_lock(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> CatalogIndex:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None and not self._read_only and self._dirty:
                self.save()
        finally:
            self.close()

    # ------------------------------------------------------------------ reads

    def contains(self, ids: Sequence[str]) -> list[bool]:
        """For each id, whether it is in the index."""
        ids = _check_ids(ids, "contains()")
        with self._rw.read():
            self._require_open("contains()")
            found = self._labels_of(ids)
        return [i in found for i in ids]

    def get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Metadata dicts (title, image, attributes) of the ids; unknown ids raise InputError."""
        ids = _check_ids(ids, "get()")
        with self._rw.read():
            self._require_open("get()")
            found = self._labels_of(ids)
            missing = [i for i in ids if i not in found]
            if missing:
                raise InputError(f"get(): ids {_preview(missing)} are not in index {self._path}")
            rows = self._rows_of(list(found.values()))
        return [rows[found[i]][1] for i in ids]

    def filter_fields(self) -> list[str]:
        """The attribute names that filters can use."""
        with self._rw.read(), self._db_lock:
            self._require_open("filter_fields()")
            return [r[0] for r in self._conn.execute(
                "SELECT DISTINCT field FROM attributes ORDER BY field")]

    def search(self, queries: np.ndarray, k: int,
               filters: Mapping[str, Any] | None = None, *, nprobe: int | None = None,
               efSearch: int | None = None,  # noqa: N803 - FAISS name
               normalize: bool = False) -> list[list[Hit]]:
        """Top-k items per query, best first, optionally restricted by attribute filters.

        ``filters`` maps a field to a value or a list of values: fields AND, values OR.
        Exactly ``min(k, matching items)`` hits come back per query.  ``nprobe`` /
        ``efSearch`` override the persistent knobs for this call.
        """
        return self._search(queries, k, filters, nprobe, efSearch, normalize, "search()")

    def search_photo(self, queries: np.ndarray, k: int,
                     filters: Mapping[str, Any] | None = None, *, depth: int = PHOTO_RERANK_DEPTH,
                     nprobe: int | None = None,
                     efSearch: int | None = None,  # noqa: N803 - FAISS name
                     normalize: bool = False) -> list[list[Hit]]:
        """Top-k items per *photo* query: the first ``max(k, depth)`` candidates of
        :meth:`search`, ranked again by the query's cosine with each candidate's photo-side
        vector, which becomes the hit's score.  The same as :meth:`search` on an index
        without photo-side vectors; arguments as there."""
        depth = check_k(depth, "search_photo()", "depth (candidates ranked again)")
        if not self._photo:
            return self.search(queries, k, filters, nprobe=nprobe, efSearch=efSearch, normalize=normalize)
        return self._search(queries, k, filters, nprobe, efSearch, normalize, "search_photo()", depth)

    def _search(self, queries: np.ndarray, k: int, filters: Mapping[str, Any] | None,
                nprobe: int | None, ef_search: int | None, normalize: bool, step: str,
                rerank_depth: int | None = None) -> list[list[Hit]]:
        """:meth:`search`, or with ``rerank_depth`` :meth:`search_photo`'s second ranking."""
        q, k, clauses, overrides = self._search_args(queries, k, filters, nprobe, ef_search, normalize, step)
        if len(q) == 0:
            return []
        with self._rw.read():
            self._require_open(step)
            if rerank_depth is None:
                distances, labels = self._ranked(q, k, clauses, overrides)
            else:
                _, candidates = self._ranked(q, max(k, rerank_depth), clauses, overrides)
                distances, labels = self._photo_ranked(q, k, candidates)
            meta = self._rows_of(np.unique(labels[labels >= 0]).tolist())
        return self._hits(distances, labels, meta)

    def _photo_ranked(self, q: np.ndarray, k: int, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The top-k of each query's candidates by their photo-side vectors; under the read lock."""
        valid = candidates >= 0
        wanted = np.unique(candidates[valid])
        found, vectors = self._photo_vectors_of(wanted)
        if len(found) != len(wanted):
            raise IndexStoreError(f"search_photo(): {self._path / CATALOG_NAME} lacks the photo-side "
                                  "vectors of some items; run verify() and re-index")
        # Every candidate's photo-side vector against its own query, in one product.
        pos = np.searchsorted(found, np.where(valid, candidates, found[0] if len(found) else 0))
        scores = (np.einsum("qkd,qd->qk", vectors[pos], q) if len(found)
                  else np.zeros(candidates.shape, np.float32))
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        distances = np.take_along_axis(scores, order, axis=1)
        labels = np.where(np.isfinite(distances), np.take_along_axis(candidates, order, axis=1), -1)
        return distances, labels

    def _search_args(self, queries: np.ndarray, k: int, filters: Mapping[str, Any] | None,
                     nprobe: int | None, ef_search: int | None, normalize: bool, step: str
                     ) -> tuple[np.ndarray, int, list[tuple[str, list[str]]], dict[str, int]]:
        q = check_embeddings(queries, self._dim, what=f"{step}: queries", normalize=normalize)
        k = check_k(k, step)
        if filters is not None and not isinstance(filters, Mapping):
            raise InputError(f"{step}: filters must be a dict {{field: value or [values]}}, "
                             f"got {type(filters).__name__}")
        clauses = [(f, filter_values(f, v)) for f, v in (filters or {}).items()]
        overrides = {}
        if nprobe is not None:
            overrides["nprobe"] = self._valid_nprobe(nprobe)
        if ef_search is not None:
            overrides["efSearch"] = self._valid_ef(ef_search)
        return q, k, clauses, overrides

    def _ranked(self, q: np.ndarray, k: int, clauses: list[tuple[str, list[str]]],
                overrides: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's top-k scores and labels (-1 past the matches); under the read lock."""
        allowed = self._labels_matching(clauses) if clauses else None
        candidates = len(allowed) if allowed is not None else self._count
        if candidates == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        expected = min(k, candidates)
        params = {**self._search_params, **overrides}
        distances, labels = self._faiss_search(q, k, allowed, params,
                                               use_gpu=not clauses and not overrides)
        short = (labels >= 0).sum(axis=1) < expected
        if short.any():
            rows = np.flatnonzero(short)
            d2, l2 = self._search_exhaustive(q[rows], k, allowed, params)
            distances[rows], labels[rows] = d2, l2
        return distances, labels

    @staticmethod
    def _hits(distances: np.ndarray, labels: np.ndarray,
              meta: Mapping[int, tuple[str, dict[str, Any]]]) -> list[list[Hit]]:
        return [[Hit(id=meta[int(lb)][0], score=float(d), label=int(lb), metadata=meta[int(lb)][1])
                 for d, lb in zip(drow, lrow) if lb >= 0]
                for drow, lrow in zip(distances, labels)]

    def _faiss_search(self, q: np.ndarray, k: int, allowed: np.ndarray | None,
                      params: Mapping[str, int], *, use_gpu: bool,
                      exhaustive_ivf: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if use_gpu and self._gpu_wanted and not len(self._tombstones):
            with self._gpu_lock:
                if self._gpu_index is None or self._gpu_stale:
                    self._gpu_index = self._clone_to_gpu()
                    self._gpu_stale = False
                return self._gpu_index.search(q, k)
        selector, keepalive = self._selector(allowed)
        search_params, more = self._search_parameters(selector, params, exhaustive_ivf)
        with _omp_threads_at_most(len(q)):
            distances, labels = self._index.search(q, k, params=search_params)
        # SWIG pointers do not own their targets: these must outlive the search call.
        del keepalive, more, selector
        return distances, labels

    def _selector(self, allowed: np.ndarray | None) -> tuple[Any, list[Any]]:
        """An IDSelector admitting ``allowed`` (minus tombstones), and objects to keep alive."""
        if allowed is None:
            if not len(self._tombstones):
                return None, []
            inner = faiss.IDSelectorBatch(self._tombstones)
            return faiss.IDSelectorNot(inner), [inner]
        # A bitmap is cheaper than a hash set when the allowed labels are dense.
        if len(allowed) * 64 > self._next_label:
            bits = np.zeros(self._next_label, dtype=bool)
            bits[allowed] = True
            bitmap = np.packbits(bits, bitorder="little")
            return faiss.IDSelectorBitmap(bitmap), [bitmap]
        return faiss.IDSelectorBatch(allowed), []

    def _search_parameters(self, selector: Any, params: Mapping[str, int],
                           exhaustive_ivf: bool) -> tuple[Any, list[Any]]:
        """FAISS search parameters carrying the selector and knobs, plus objects to keep alive."""
        extra: dict[str, Any] = {} if selector is None else {"sel": selector}
        ivf = _ivf_of(self._index)
        if ivf is not None:
            nprobe = int(ivf.nlist if exhaustive_ivf else params.get("nprobe", ivf.nprobe))
            if "efSearch" in params and _ivf_quantizer_hnsw(self._index) is not None:
                quantizer_params = faiss.SearchParametersHNSW(
                    efSearch=int(max(params["efSearch"], nprobe)))
                return faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=quantizer_params,
                                                 **extra), [quantizer_params]
            return faiss.SearchParametersIVF(nprobe=nprobe, **extra), []
        hnsw = _hnsw_of(self._index)
        if hnsw is not None:
            ef = int(params.get("efSearch", hnsw.hnsw.efSearch))
            return faiss.SearchParametersHNSW(efSearch=ef, **extra), []
        return faiss.SearchParameters(**extra), []

    def _search_exhaustive(self, q: np.ndarray, k: int, allowed: np.ndarray | None,
                           params: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """Search again the queries for which the approximate search found too few items.

        IVF: scan every list (``nprobe = nlist``), still through the selector.  Anything
        else (graph indexes), or an IVF whose coarse quantizer is itself approximate: an
        exact scan over the admissible vectors.
        """
        expected = min(k, len(allowed) if allowed is not None else self._count)
        best: tuple[np.ndarray, np.ndarray] | None = None
        if _ivf_of(self._index) is not None:
            best = self._faiss_search(q, k, allowed, params, use_gpu=False, exhaustive_ivf=True)
            if ((best[1] >= 0).sum(axis=1) >= expected).all():
                return best
        if allowed is None:
            with self._db_lock:
                allowed = np.fromiter((r[0] for r in self._conn.execute(
                    "SELECT label FROM items ORDER BY label")), dtype=np.int64)
        try:
            return self._exact_scan(q, k, allowed)
        except RuntimeError as exc:
            logger.warning("search: %s cannot reconstruct vectors (%s); %d queries get fewer "
                           "than %d results", self._factory, _faiss_reason(exc), len(q),
                           expected)
            if best is None:
                best = self._faiss_search(q, k, allowed, params, use_gpu=False)
            return best

    def _exact_scan(self, q: np.ndarray, k: int,
                    labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        best_d = np.full((len(q), k), -np.inf, dtype=np.float32)
        best_l = np.full((len(q), k), -1, dtype=np.int64)
        for start in range(0, len(labels), _RECONSTRUCT_CHUNK):
            chunk = labels[start:start + _RECONSTRUCT_CHUNK]
            vectors = self._index.reconstruct_batch(chunk)
            scores = q @ vectors.T
            all_d = np.concatenate([best_d, scores], axis=1)
            all_l = np.concatenate([best_l, np.broadcast_to(chunk, scores.shape)], axis=1)
            top = np.argsort(-all_d, axis=1, kind="stable")[:, :k]
            best_d = np.take_along_axis(all_d, top, axis=1)
            best_l = np.take_along_axis(all_l, top, axis=1)
        best_l[~np.isfinite(best_d)] = -1
        return best_d, best_l

    # ------------------------------------------------------------------ SQL helpers

    def _scalar(self, sql: str) -> int:
        return int(self._conn.execute(sql).fetchone()[0])

    def _select_in(self, sql: str, values: Sequence[Any]) -> list[tuple]:
        """The rows of ``sql``, whose one ``{}`` is filled with an ``IN`` list, over
        ``values`` in chunks below SQLite's bound-parameter limit."""
        rows: list[tuple] = []
        with self._db_lock:
            for start in range(0, len(values), _SQL_CHUNK):
                chunk = list(values[start:start + _SQL_CHUNK])
                rows += self._conn.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    def _labels_of(self, ids: Sequence[str]) -> dict[str, int]:
        return dict(self._select_in("SELECT id, label FROM items WHERE id IN ({})", list(dict.fromkeys(ids))))

    def _rows_of(self, labels: Sequence[int]) -> dict[int, tuple[str, dict[str, Any]]]:
        out: dict[int, tuple[str, dict[str, Any]]] = {}
        for label, item_id, title, image, attrs in self._select_in(
                "SELECT label, id, title, image, attributes FROM items WHERE label IN ({})",
                [int(x) for x in labels]):
            meta: dict[str, Any] = {}
            if title is not None:
                meta[TITLE_KEY] = title
            if image is not None:
                meta[IMAGE_KEY] = image
            meta.update(json.loads(attrs))
            out[label] = (item_id, meta)
        return out

    def _photo_vectors_of(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(labels found, sorted; their photo-side vectors [n, dim])``."""
        rows = self._select_in("SELECT label, vector FROM photo_vectors WHERE label IN ({})",
                               [int(x) for x in labels])
        found = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self._dim)
        order = np.argsort(found, kind="stable")
        return found[order], vectors[order]

    def _labels_matching(self, clauses: list[tuple[str, list[str]]]) -> np.ndarray:
        parts, args = [], []
        for field_name, values in clauses:
            marks = ",".join("?" * len(values))
            parts.append("SELECT DISTINCT label FROM attributes "
                         f"WHERE field = ? AND value IN ({marks})")
            args += [field_name, *values]
        sql = " INTERSECT ".join(parts) + " ORDER BY label"
        with self._db_lock:
            return np.fromiter((r[0] for r in self._conn.execute(sql, args)), dtype=np.int64)

    def _begin(self) -> None:
        if not self._in_txn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_txn = True

    def _require_open(self, step: str) -> None:
        if self._closed:
            raise IndexStoreError(f"{step}: index {self._path} is closed; open it again")

    def _require_writable(self, step: str) -> None:
        self._require_open(step)
        if self._read_only:
            raise IndexStoreError(f"{step}: index {self._path} was opened read-only "
                                  "(mmap=True or read_only=True); reopen it with "
                                  "CatalogIndex.open(path) to modify it")

    # ------------------------------------------------------------------ GPU

    def to_gpu(self) -> None:
        """Serve unfiltered searches from a clone on all visible GPUs (see module docstring)."""
        _require_gpu()
        with self._rw.write():
            with self._gpu_lock:
                self._gpu_index = self._clone_to_gpu()
                self._gpu_stale = False
            self._gpu_wanted = True

    def _clone_to_gpu(self) -> Any:
        try:
            gpu_index = faiss.index_cpu_to_all_gpus(self._index)
        except RuntimeError as exc:
            raise IndexStoreError(f"to_gpu(): FAISS has no GPU version of factory "
                                  f"{self._factory}: {_faiss_reason(exc)}; search it on "
                                  "CPU") from exc
        if "nprobe" in self._search_params:
            try:
                faiss.GpuParameterSpace().set_index_parameter(
                    gpu_index, "nprobe", self._search_params["nprobe"])
            except RuntimeError as exc:
                logger.warning("to_gpu(): could not set nprobe on the GPU index: %s",
                               _faiss_reason(exc))
        return gpu_index


# --------------------------------------------------------------------------- opening helpers


def _faiss_reason(exc: BaseException) -> str:
    """The useful last line of a FAISS exception (it prefixes C++ locations)."""
    text = str(exc).strip()
    marker = "Error: "
    return text[text.rfind(marker) + len(marker):] if marker in text else text


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)


def _acquire_writer_lock(root: Path) -> int | None:
    if fcntl is None:  # pragma: no cover - Windows
        logger.warning("no fcntl: writers to %s are not excluded", root)
        return None
    lock_path = root / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise IndexStoreError(f"index {root} is open for writing elsewhere ({lock_path} is "
                              "locked); close that writer, or open with read_only=True") from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _release_writer_lock(fd: int | None) -> None:
    if fd is None:
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    try:
        if read_only:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                   isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # WAL: readers in other processes keep reading the last commit while this
            # writer holds its transaction open; FULL: a COMMIT survives power loss.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
    except sqlite3.Error as exc:
        raise IndexStoreError(f"cannot open {path}: {exc}") from exc
    return conn


_META_KEYS = ("format_version", "dim", "factory", "metric", "fingerprint", "generation",
              "next_label", "id_mode", "removal")


def _read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
        meta = {k: json.loads(v) for k, v in rows}
    except (sqlite3.Error, ValueError) as exc:
        raise IndexStoreError(f"open(): {path} is not a readable catalogue database: "
                              f"{exc}") from exc
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise IndexStoreError(f"open(): {path} lacks metadata {missing}; it was not written "
                              "by this version of xmsearch or is damaged")
    if int(meta["generation"]) < 1:
        raise IndexStoreError(f"open(): {path} was never saved (generation 0): creating the "
                              "index was interrupted; remove the directory and create it again")
    return meta


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexStoreError(f"open(): {path} is not readable JSON ({exc}); restore it or "
                              "re-index") from exc
    required = ("format_version", "dim", "factory", "fingerprint", "generation")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        raise IndexStoreError(f"open(): {path} lacks one of {list(required)}; restore it or "
                              "re-index")
    if manifest["format_version"] != FORMAT_VERSION:
        raise IndexStoreError(f"open(): {path} has format_version {manifest['format_version']}, "
                              f"this xmsearch reads version {FORMAT_VERSION}; re-index or "
                              "use the matching xmsearch version")
    return manifest


def _check_manifest(manifest: Mapping[str, Any], meta: Mapping[str, Any],
                    manifest_path: Path, catalog_path: Path) -> None:
    for key in ("dim", "fingerprint", "factory"):
        if manifest[key] != meta[key]:
            raise IndexStoreError(
                f"open(): {manifest_path} says {key} = {manifest[key]!r} but {catalog_path} "
                f"says {meta[key]!r}: the files come from different indexes; restore the "
                "directory from one backup or re-index")
    gap = int(meta["generation"]) - int(manifest["generation"])
    if gap not in (0, 1):
        raise IndexStoreError(
            f"open(): {manifest_path} is at generation {manifest['generation']} but "
            f"{catalog_path} is at {meta['generation']}: the files come from different saves; "
            "restore the directory from one backup or re-index")


def _read_faiss(path: Path, *, mmap: bool, ivf: bool) -> Any:
    if not path.exists():
        raise IndexStoreError(f"open(): {path} is missing (the catalogue's committed "
                              "generation points at it); restore it or re-index")
    flags = 0
    if mmap:
        # IVF maps its inverted lists; other indexes map their flat code arrays.  The two
        # mmap flags cannot be combined (FAISS refuses), hence the choice by kind.
        flags = (faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise IndexStoreError(f"open(): {path} is not a readable FAISS index (truncated or "
                              f"corrupt?): {_faiss_reason(exc)}; restore it or "
                              "re-index") from exc


def _check_faiss(index: Any, meta: Mapping[str, Any], faiss_path: Path,
                 manifest_path: Path) -> None:
    if index.d != int(meta["dim"]):
        raise IndexStoreError(f"open(): {faiss_path} holds {index.d}-d vectors but "
                              f"{manifest_path} says dim {meta['dim']}; re-index")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexStoreError(f"open(): {faiss_path} does not use inner product; it was not "
                              "written by xmsearch; re-index")
