"""The catalogue index in a Milvus collection, for catalogues beyond one machine.

:class:`MilvusIndex` keeps the contract that ingestion and search rely on in
:class:`~xmsearch.client.index.CatalogIndex` (the FAISS + SQLite directory): the same
``add`` / ``delete`` / ``contains`` / ``get`` / ``search`` / ``search_photo`` calls, the same
checks on ids, vectors and metadata, the same filter semantics and the same errors, so
``xmsearch index --out milvus:...`` and ``Searcher("milvus:...", ...)`` work unchanged.
The vectors live in Milvus, which shards, replicates and persists them; the client keeps
nothing but a connection.

Where
    A location is ``milvus:URI[#COLLECTION]``: ``URI`` is what ``pymilvus.MilvusClient``
    takes, a Milvus server (``http://host:19530``) or a Milvus Lite file (``items.db``, one
    process at a time, for tests and laptops); the collection defaults to
    :data:`DEFAULT_COLLECTION`.

Collection
    One row per item: ``id`` (VARCHAR primary key), ``vector`` (the item vector FAISS would
    hold), ``photo`` (the photo-side vector, when the index keeps them), ``meta`` (JSON: the
    metadata a hit returns) and ``tags`` (an array with one hash per indexed attribute
    ``(field, value)``).  The model fingerprint, dimension and whether photo-side vectors are
    kept are the collection property :data:`MANIFEST_PROPERTY`; a collection without it is
    not opened.  Metric: inner product over unit vectors (cosine).

Filters
    As in :class:`CatalogIndex`: ``{field: value | [values]}`` ANDs the fields and ORs the
    values of one field, matching the values' text forms (lists match any element).  Each
    ``(field, value)`` pair is stored and asked for as a 128-bit hash of its JSON form, so a
    filter expression holds only hex strings: no user text is ever parsed as a Milvus
    expression (Milvus Lite has no expression templates to bind it safely).

Durability and consistency
    Rows are written when :meth:`MilvusIndex.add` returns (one insert request per call,
    checked in full before it is sent, so a refused call writes nothing) and are visible to
    searches at once (the collection's consistency level is ``Strong``); :meth:`save` flushes
    them to sealed segments.  An interrupted ingest keeps what was added, and
    ``--resume`` skips it, as with the directory index.  Searches are exact on Milvus Lite
    (a flat scan) and on a server's FLAT collection (``--factory Flat``, the default); with
    an approximate index type (``--factory milvus:HNSW``, ...) a server may return fewer than
    ``k`` hits under a narrow filter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from xmsearch.client.index import (
    _JSON,
    PHOTO_RERANK_DEPTH,
    Hit,
    _check_ids,
    _item_row,
    _preview,
    check_additions,
    check_alt_titles,
    check_embeddings,
    check_k,
    check_photo_views,
    filter_values,
)
from xmsearch.errors import IndexStoreError, InputError, XmsearchError

__all__ = ["DEFAULT_COLLECTION", "MANIFEST_PROPERTY", "MilvusIndex", "MilvusLocation"]

logger = logging.getLogger(__name__)

SCHEME = "milvus:"
DEFAULT_COLLECTION = "xmsearch_items"
MANIFEST_PROPERTY = "xmsearch.manifest"
FORMAT_VERSION = 1
# Limits of the schema, checked before anything is sent (Milvus would refuse the whole
# insert with a less specific message).
MAX_ID_BYTES = 1024
MAX_TAGS = 1024  # indexed (field, value) pairs per item
MAX_META_BYTES = 65_536  # Milvus' default limit on one JSON value
MAX_K = 16_384  # Milvus' limit on a search's top-k
_CHUNK = 1000  # ids per get/delete request
_TAG_BYTES = 16


@dataclass(frozen=True)
class MilvusLocation:
    """A collection in a Milvus server or Milvus Lite file: ``milvus:URI[#COLLECTION]``."""

    uri: str
    collection: str = DEFAULT_COLLECTION

    @classmethod
    def parse(cls, text: str) -> MilvusLocation:
        if not text.startswith(SCHEME):
            raise InputError(f"{text!r} is not a Milvus location (milvus:URI[#COLLECTION])")
        uri, _, collection = text[len(SCHEME):].partition("#")
        collection = collection or DEFAULT_COLLECTION
        if not uri:
            raise InputError(f"{text!r}: no URI after 'milvus:'; give a server "
                             "(milvus:http://host:19530) or a Milvus Lite file (milvus:items.db)")
        if not (collection[0].isascii() and (collection[0].isalpha() or collection[0] == "_")
                and all(c.isascii() and (c.isalnum() or c == "_") for c in collection)
                and len(collection) <= 255):
            raise InputError(f"{text!r}: collection name {collection!r} must start with a letter "
                             "or '_' and hold only ASCII letters, digits and '_' (at most 255)")
        return cls(uri, collection)

    def __str__(self) -> str:
        return f"{SCHEME}{self.uri}#{self.collection}"


def is_milvus(location: object) -> bool:
    """Whether ``location`` names a Milvus collection rather than an index directory."""
    return isinstance(location, MilvusLocation) or (isinstance(location, str) and location.startswith(SCHEME))


def _location(location: MilvusLocation | str) -> MilvusLocation:
    return location if isinstance(location, MilvusLocation) else MilvusLocation.parse(location)


def _tag(field_name: str, value: str) -> str:
    """The stored form of one indexed attribute pair: hex, safe inside an expression."""
    text = _JSON.encode([field_name, value]).encode()
    return hashlib.blake2b(text, digest_size=_TAG_BYTES).hexdigest()


def _connect(loc: MilvusLocation) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:  # pragma: no cover - pymilvus is a dependency
        raise IndexStoreError("a milvus: index needs pymilvus (and milvus-lite for a local "
                              "file): pip install 'xmsearch[milvus]'") from exc
    try:
        return MilvusClient(loc.uri)
    except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for one cause
        raise IndexStoreError(f"cannot connect to Milvus at {loc.uri}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _index_tags(client: Any, loc: MilvusLocation) -> None:
    """An inverted index on the attribute tags, where Milvus has one for ARRAY fields (a server
    since 2.5): filters then look their items up instead of testing every row.  Milvus Lite
    has none and scans (about 160 us per item on 2 cores: benchmarks/results/milvus_index.md)."""
    tags = client.prepare_index_params()
    tags.add_index("tags", index_type="INVERTED")
    # pymilvus logs every refused call with a traceback; this refusal is expected on Lite.
    rpc_log = logging.getLogger("pymilvus.decorators")
    level = rpc_log.level
    rpc_log.setLevel(logging.CRITICAL)
    try:
        client.create_index(loc.collection, tags, sync=False)
    except Exception as exc:  # noqa: BLE001 - a missing scalar index is slower, not wrong
        logger.info("%s: no inverted index on the attribute tags (%s); filters scan the rows",
                    loc, _reason(exc))
    finally:
        rpc_log.setLevel(level)


@contextmanager
def _closed_on_error(client: Any, step: str, loc: MilvusLocation) -> Iterator[None]:
    """Close ``client`` when setting up an index on it fails; Milvus' own errors become
    IndexStoreError naming the step and the collection."""
    try:
        yield
    except XmsearchError:
        client.close()
        raise
    except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for one cause
        client.close()
        raise IndexStoreError(f"{step}: Milvus refused the request on {loc}: {_reason(exc)}") from exc


class MilvusIndex:
    """A catalogue index in one Milvus collection (see the module notes).

    Build one with :meth:`create`, open one with :meth:`open`; the interface is
    :class:`~xmsearch.client.index.CatalogIndex`'s where Milvus can keep it.  Hits carry
    label -1: Milvus keys rows by the catalogue id itself.
    """

    def __init__(self, client: Any, loc: MilvusLocation, manifest: Mapping[str, Any], *,
                 read_only: bool) -> None:
        # Private: use create() or open().
        self._client = client
        self._loc = loc
        self._dim = int(manifest["dim"])
        self._fingerprint = str(manifest["fingerprint"])
        self._photo = bool(manifest["photo_vectors"])
        self._photo_views = int(manifest.get("photo_views", 0))
        self._alt_titles = bool(manifest.get("alt_titles", False))
        self._index_type = str(manifest.get("index_type", "AUTOINDEX"))
        self._read_only = read_only
        self._search_params: dict[str, int] = {}
        self._write_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def exists(cls, location: MilvusLocation | str) -> bool:
        loc = _location(location)
        client = _connect(loc)
        try:
            return bool(client.has_collection(loc.collection))
        finally:
            client.close()

    @classmethod
    def create(cls, location: MilvusLocation | str, dim: int, *, fingerprint: str,
               photo_vectors: bool = False, photo_views: int = 0, alt_titles: bool = False,
               index_type: str = "AUTOINDEX",
               index_params: Mapping[str, Any] | None = None) -> MilvusIndex:
        """Create the collection; an existing one is refused (delete it in Milvus first).
        ``photo_vectors``, ``photo_views`` and ``alt_titles`` as for :meth:`CatalogIndex.create`."""
        from pymilvus import DataType

        loc = _location(location)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InputError(f"create(): dim must be a positive integer, got {dim!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise InputError("create(): fingerprint must name the model (a non-empty string)")
        check_photo_views(photo_views, photo_vectors)
        check_alt_titles(alt_titles)
        client = _connect(loc)
        with _closed_on_error(client, "create()", loc):
            if client.has_collection(loc.collection):
                raise IndexStoreError(f"create(): {loc} already exists: pass --resume or --add to "
                                      "use it, or drop the collection first")
            manifest = {"format_version": FORMAT_VERSION, "dim": dim, "fingerprint": fingerprint,
                        "photo_vectors": bool(photo_vectors), "photo_views": int(photo_views),
                        "alt_titles": alt_titles, "metric": "ip", "index_type": index_type}
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            if photo_vectors:
                schema.add_field("photo", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("meta", DataType.JSON)
            schema.add_field("tags", DataType.ARRAY, element_type=DataType.VARCHAR,
                             max_capacity=MAX_TAGS, max_length=2 * _TAG_BYTES)
            indexes = client.prepare_index_params()
            for name in ("vector", "photo") if photo_vectors else ("vector",):
                indexes.add_index(name, index_type=index_type, metric_type="IP", params=dict(index_params or {}))
            client.create_collection(loc.collection, schema=schema, consistency_level="Strong",
                                     properties={MANIFEST_PROPERTY: json.dumps(manifest)})
            # Not waited for: an empty collection's index is there at once, and the wait asks
            # for a timestamp that Milvus Lite does not serve (its gRPC server logs a traceback).
            client.create_index(loc.collection, indexes, sync=False)
            _index_tags(client, loc)
            client.load_collection(loc.collection)
        logger.info("created Milvus collection %s (dim %d)", loc, dim)
        return cls(client, loc, manifest, read_only=False)

    @classmethod
    def open(cls, location: MilvusLocation | str, *, read_only: bool = False, mmap: bool = False,
             gpu: bool = False) -> MilvusIndex:
        """Open an existing collection.  ``mmap`` implies ``read_only`` (as for an index
        directory; Milvus decides itself how it holds the vectors); ``gpu`` is refused:
        a Milvus server uses its GPUs through its own index types."""
        loc = _location(location)
        if gpu:
            raise InputError(f"open(): {loc} is a Milvus collection; a GPU is Milvus' own "
                             "setting (a GPU index type on the server), not the client's")
        client = _connect(loc)
        with _closed_on_error(client, "open()", loc):
            if not client.has_collection(loc.collection):
                raise IndexStoreError(f"open(): {loc} does not exist; create it with `xmsearch index "
                                      f"--out {loc}` or check the URI and collection name")
            props = client.describe_collection(loc.collection).get("properties") or {}
            if MANIFEST_PROPERTY not in props:
                raise IndexStoreError(f"open(): collection {loc} has no {MANIFEST_PROPERTY!r} "
                                      "property: it was not made by xmsearch")
            manifest = json.loads(props[MANIFEST_PROPERTY])
            if manifest.get("format_version") != FORMAT_VERSION:
                raise IndexStoreError(f"open(): collection {loc} has format "
                                      f"{manifest.get('format_version')!r}, this xmsearch reads "
                                      f"{FORMAT_VERSION}")
            client.load_collection(loc.collection)
        return cls(client, loc, manifest, read_only=read_only or mmap)

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> MilvusLocation:
        """Where the index lives."""
        return self._loc

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def factory(self) -> str:
        """The collection's Milvus index type."""
        return f"milvus:{self._index_type}"

    @property
    def metric(self) -> str:
        return "ip"

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def has_photo_vectors(self) -> bool:
        return self._photo

    @property
    def photo_views(self) -> int:
        return self._photo_views

    @property
    def alt_titles(self) -> bool:
        return self._alt_titles

    @property
    def needs_training(self) -> bool:
        """Never: Milvus builds and trains its index itself."""
        return False

    @property
    def training_size(self) -> tuple[int, int]:
        return 0, 0

    @property
    def search_params(self) -> dict[str, int]:
        return dict(self._search_params)

    def __len__(self) -> int:
        rows = self._call("len()", self._client.query, self._loc.collection, filter="",
                          output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def __repr__(self) -> str:
        return (f"MilvusIndex({str(self._loc)!r}, dim={self._dim}"
                f"{', read_only' if self._read_only else ''})")

    def check_fingerprint(self, served: str) -> None:
        """Raise IndexStoreError unless ``served`` equals the collection's model fingerprint."""
        if served != self._fingerprint:
            raise IndexStoreError(
                f"index {self._loc} was embedded by model fingerprint {self._fingerprint}, "
                f"server has {served}: vectors of two models are meaningless together; "
                "re-index or point at the right server")

    # ------------------------------------------------------------------ writes

    def train(self, sample: np.ndarray, *, normalize: bool = False) -> None:
        """Nothing to do: Milvus trains the collection's index itself."""

    def set_search_params(self, *, nprobe: int | None = None,
                          efSearch: int | None = None) -> None:  # noqa: N803 - FAISS name
        """Search knobs for this client (``nprobe`` of IVF, ``ef`` of HNSW collections)."""
        for name, value in (("nprobe", nprobe), ("ef", efSearch)):
            if value is not None:
                self._search_params[name] = check_k(value, "set_search_params()", name)

    def add(self, ids: Sequence[str], vectors: np.ndarray,
            metadata: Sequence[Mapping[str, Any] | None] | None = None, *,
            upsert: bool = False, normalize: bool = False,
            photo_vectors: np.ndarray | None = None) -> list[int]:
        """Add items (as :meth:`CatalogIndex.add`); returns -1 per item (no labels)."""
        ids, x, photo, metas = check_additions(ids, vectors, metadata, photo_vectors, dim=self._dim,
                                               keeps_photo=self._photo, where=self._loc,
                                               normalize=normalize)
        rows = [self._row(i, item_id, meta, x, photo) for i, (item_id, meta) in enumerate(zip(ids, metas))]
        if not rows:
            return []
        with self._write_lock:
            self._require_writable("add()")
            existing = [i for i, there in zip(ids, self._contains(ids, "add()")) if there]
            if existing and not upsert:
                raise InputError(f"add(): ids {_preview(sorted(existing))} are already in index "
                                 f"{self._loc}; use upsert=True to replace them or delete them first")
            write = self._client.upsert if existing else self._client.insert
            self._call("add()", write, self._loc.collection, rows)
        return [-1] * len(rows)

    def _row(self, i: int, item_id: str, meta: Any, x: np.ndarray, photo: np.ndarray | None) -> dict:
        if len(item_id.encode()) > MAX_ID_BYTES:
            raise InputError(f"add(): id {item_id[:40]!r}... is {len(item_id.encode())} bytes in UTF-8; "
                             f"a Milvus index takes ids of at most {MAX_ID_BYTES}")
        title, image, attrs, pairs = _item_row(item_id, meta)
        stored: dict[str, Any] = {}
        if title is not None:
            stored["title"] = title
        if image is not None:
            stored["image"] = image
        stored.update(attrs)
        try:
            meta_json = _JSON.encode(stored)
        except (TypeError, ValueError) as exc:
            raise InputError(f"add(): metadata of id {item_id!r} is not JSON-serialisable ({exc})") from exc
        if len(meta_json.encode()) > MAX_META_BYTES:
            raise InputError(f"add(): metadata of id {item_id!r} is {len(meta_json.encode())} bytes as "
                             f"JSON; a Milvus index keeps at most {MAX_META_BYTES} per item")
        tags = sorted({_tag(f, v) for f, v in pairs})
        if len(tags) > MAX_TAGS:
            raise InputError(f"add(): id {item_id!r} has {len(tags)} attribute values to filter on; "
                             f"a Milvus index keeps at most {MAX_TAGS} per item")
        row = {"id": item_id, "vector": x[i].tolist(), "meta": json.loads(meta_json), "tags": tags}
        if photo is not None:
            row["photo"] = photo[i].tolist()
        return row

    def delete(self, ids: Sequence[str], *, missing_ok: bool = False) -> int:
        """Delete items by id; unknown ids raise InputError naming them unless ``missing_ok``."""
        ids = list(dict.fromkeys(_check_ids(ids, "delete()")))
        with self._write_lock:
            self._require_writable("delete()")
            found = [i for i, there in zip(ids, self._contains(ids, "delete()")) if there]
            missing = sorted(set(ids) - set(found))
            if missing and not missing_ok:
                raise InputError(f"delete(): ids {_preview(missing)} are not in index {self._loc}; "
                                 "pass missing_ok=True to ignore them")
            for start in range(0, len(found), _CHUNK):
                self._call("delete()", self._client.delete, self._loc.collection,
                           ids=found[start:start + _CHUNK])
        return len(found)

    def save(self) -> None:
        """Flush the collection's rows to sealed segments (they are visible before)."""
        with self._write_lock:
            self._require_writable("save()")
            self._call("save()", self._client.flush, self._loc.collection)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._client.close()
        except Exception as exc:  # noqa: BLE001 - closing must not hide the caller's error
            logger.warning("closing %s: %s", self._loc, _reason(exc))

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None and not self._read_only:
                self.save()
        finally:
            self.close()

    # ------------------------------------------------------------------ reads

    def contains(self, ids: Sequence[str]) -> list[bool]:
        """For each id, whether it is in the index."""
        return self._contains(_check_ids(ids, "contains()"), "contains()")

    def _contains(self, ids: list[str], step: str) -> list[bool]:
        found = self._rows(ids, ["id"], step)
        return [i in found for i in ids]

    def _rows(self, ids: list[str], fields: list[str], step: str) -> dict[str, dict[str, Any]]:
        """id -> the stored ``fields`` of each of ``ids`` the collection holds."""
        found: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), _CHUNK):
            for r in self._call(step, self._client.get, self._loc.collection,
                                ids=unique[start:start + _CHUNK], output_fields=fields):
                found[r["id"]] = r
        return found

    def get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Metadata dicts (title, image, attributes) of the ids; unknown ids raise InputError."""
        ids = _check_ids(ids, "get()")
        found = {i: r["meta"] for i, r in self._rows(ids, ["meta"], "get()").items()}
        missing = [i for i in ids if i not in found]
        if missing:
            raise InputError(f"get(): ids {_preview(missing)} are not in index {self._loc}")
        return [dict(found[i]) for i in ids]

    def search(self, queries: np.ndarray, k: int, filters: Mapping[str, Any] | None = None, *,
               nprobe: int | None = None, efSearch: int | None = None,  # noqa: N803
               normalize: bool = False) -> list[list[Hit]]:
        """Top-k items per query, best first (as :meth:`CatalogIndex.search`)."""
        q, k, expr, params = self._search_args(queries, k, filters, nprobe, efSearch, normalize, "search()")
        if len(q) == 0:
            return []
        results = self._milvus_search("search()", q, k, expr, params, ["meta"])
        return [[Hit(id=r["id"], score=float(r["distance"]), label=-1, metadata=dict(r["entity"]["meta"]))
                 for r in rows] for rows in results]

    def search_photo(self, queries: np.ndarray, k: int, filters: Mapping[str, Any] | None = None, *,
                     depth: int = PHOTO_RERANK_DEPTH, nprobe: int | None = None,
                     efSearch: int | None = None,  # noqa: N803
                     normalize: bool = False) -> list[list[Hit]]:
        """Top-k per *photo* query: the first ``max(k, depth)`` candidates of :meth:`search`
        ranked again by their photo-side vectors (as :meth:`CatalogIndex.search_photo`)."""
        depth = check_k(depth, "search_photo()", "depth (candidates ranked again)")
        if not self._photo:
            return self.search(queries, k, filters, nprobe=nprobe, efSearch=efSearch, normalize=normalize)
        q, k, expr, params = self._search_args(queries, k, filters, nprobe, efSearch, normalize,
                                               "search_photo()")
        if len(q) == 0:
            return []
        results = self._milvus_search("search_photo()", q, min(max(k, depth), MAX_K), expr, params,
                                      ["meta", "photo"])
        out = []
        for qv, rows in zip(q, results):
            if not rows:
                out.append([])
                continue
            scores = np.asarray([r["entity"]["photo"] for r in rows], np.float32) @ qv
            order = np.argsort(-scores, kind="stable")[:k]
            out.append([Hit(id=rows[j]["id"], score=float(scores[j]), label=-1,
                            metadata=dict(rows[j]["entity"]["meta"])) for j in order])
        return out

    def _search_args(self, queries: np.ndarray, k: int, filters: Mapping[str, Any] | None,
                     nprobe: int | None, ef_search: int | None, normalize: bool, step: str
                     ) -> tuple[np.ndarray, int, str, dict[str, int]]:
        self._require_open(step)
        q = check_embeddings(queries, self._dim, what=f"{step}: queries", normalize=normalize)
        k = check_k(k, step)
        if k > MAX_K:
            raise InputError(f"{step}: k={k} is over Milvus' limit of {MAX_K} results per query")
        if filters is not None and not isinstance(filters, Mapping):
            raise InputError(f"{step}: filters must be a dict {{field: value or [values]}}, "
                             f"got {type(filters).__name__}")
        clauses = [[_tag(f, v) for v in filter_values(f, values)] for f, values in (filters or {}).items()]
        expr = " and ".join(f"array_contains_any(tags, {json.dumps(tags)})" for tags in clauses)
        params = dict(self._search_params)
        for name, value in (("nprobe", nprobe), ("ef", ef_search)):
            if value is not None:
                params[name] = check_k(value, step, name)
        return q, k, expr, params

    def _milvus_search(self, step: str, q: np.ndarray, limit: int, expr: str,
                       params: Mapping[str, int], fields: list[str]) -> list[list[dict]]:
        return self._call(step, self._client.search, self._loc.collection, data=q.tolist(),
                          anns_field="vector", limit=limit, filter=expr, output_fields=fields,
                          search_params={"metric_type": "IP", "params": dict(params)})

    # ------------------------------------------------------------------ helpers

    def _call(self, step: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self._require_open(step)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every Milvus failure becomes one error type
            raise IndexStoreError(f"{step}: Milvus refused the request on {self._loc}: {_reason(exc)}") from exc

    def _require_open(self, step: str) -> None:
        if self._closed:
            raise IndexStoreError(f"{step}: index {self._loc} is closed")

    def _require_writable(self, step: str) -> None:
        self._require_open(step)
        if self._read_only:
            raise IndexStoreError(f"{step}: index {self._loc} was opened read-only")
