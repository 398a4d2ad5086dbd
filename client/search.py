"""Search: a query (text, photo or both) -> served embedding -> FAISS top-k with filters
(photo queries: FAISS candidates ranked again by the items' photo-side vectors,
:meth:`CatalogIndex.search_photo`).

Single queries from many threads (a web front end sharing one :class:`Searcher`) are
answered together: while one round of queries is being embedded and searched, the queries
that arrive queue up, and the next round takes them all in one request to the ensemble and
one FAISS search.  Nothing waits for a batch to fill: a query that finds the searcher idle
is sent at once, so a lone caller sees the latency it would alone, and a busy server gets
bigger batches instead of more requests (the same trade as Triton's dynamic batcher with
no queue delay).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmsearch.client.embed import Embedder, embed_isolating, read_image
from xmsearch.client.index import Hit, check_k, filter_values
from xmsearch.client.stores import Location, open_index
from xmsearch.errors import InputError, for_caller

Filters = Mapping[str, str | Sequence[str]]


@dataclass(frozen=True)
class _Query:
    text: str | None
    photo: bytes | None
    k: int
    filters: Filters | None

    @property
    def kind(self) -> str:
        return "text_image" if self.text is not None and self.photo is not None else (
            "text" if self.text is not None else "image")


def _filters_key(filters: Filters | None) -> object:
    """Queries whose filters mean the same (as the index reads them) share one FAISS search."""
    if not filters:
        return None
    try:
        return tuple((f, tuple(filter_values(f, v))) for f, v in filters.items())
    except (InputError, AttributeError):  # refused by the index: searched on its own, to fail there
        return ("refused", id(filters))


class _Slot:
    """One waiting caller: its query, then its outcome (hits or an error)."""

    __slots__ = ("query", "outcome", "wake", "finished", "lead")

    def __init__(self, query: _Query):
        self.query = query
        self.outcome: list[Hit] | BaseException | None = None
        self.wake = threading.Event()  # set when the caller is to lead a round, or is answered
        self.finished = threading.Event()  # set when it is answered
        self.lead = False

    def answer(self, outcome: list[Hit] | BaseException) -> None:
        self.outcome = outcome
        self.finished.set()
        self.wake.set()

    def result(self) -> list[Hit]:
        return _unwrap(self.outcome)  # type: ignore[arg-type]


class _Combiner:
    """Flat combining: callers queue their query; a caller that finds fewer than
    ``max_leaders`` rounds in progress leads one itself (takes every waiting query, up to
    ``max_rows``, and answers them with one call of ``answer``).  When a leader's own query
    is answered it hands the lead to the oldest waiting caller, or steps down.  No thread of
    its own, no timer: the callers do the work."""

    def __init__(self, answer: Callable[[list[_Query]], list], max_rows: int, max_leaders: int):
        self._answer = answer
        self._max_rows = max_rows
        self._max_leaders = max_leaders
        self._lock = threading.Lock()
        self._pending: list[_Slot] = []
        self._leaders = 0

    def __call__(self, query: _Query) -> list[Hit]:
        slot = _Slot(query)
        with self._lock:
            self._pending.append(slot)
            if self._leaders < self._max_leaders:
                self._leaders += 1
                slot.lead = True
        if not slot.lead:
            slot.wake.wait()  # answered by a leader's round, or made a leader
            # A caller made a leader counts as one even if another round answered it meanwhile:
            # it must go through the hand-off below.
            if not slot.lead:
                return slot.result()
        try:
            while not slot.finished.is_set():
                with self._lock:
                    batch = self._pending[:self._max_rows]
                    del self._pending[:self._max_rows]
                if not batch:  # another leader took this query: wait for its round
                    slot.finished.wait()
                    break
                self._round(batch)
        finally:
            with self._lock:
                heir = next((s for s in self._pending if not s.lead), None)
                if heir is None:
                    self._leaders -= 1
                else:
                    heir.lead = True
                    heir.wake.set()
        return slot.result()

    def _round(self, batch: list[_Slot]) -> None:
        try:
            outcomes = self._answer([s.query for s in batch])
        except BaseException as exc:  # noqa: BLE001 - every caller of the round must hear of it
            outcomes = [exc] * len(batch)
        for s, outcome in zip(batch, outcomes):
            s.answer(for_caller(outcome) if isinstance(outcome, BaseException) and len(batch) > 1 else outcome)


class Searcher:
    """Answers queries against one index through one server (fingerprints must agree).

    Thread-safe: share one per process.  ``combine`` (default on) answers concurrent
    :meth:`search` calls of the same kind together, at most ``max_combined`` per request
    and at most ``rounds_in_flight`` rounds per kind at once (see the module notes); off,
    each call sends its own request.  Three rounds in flight kept the text gain of two
    (queries/s at concurrency 16) and lost less on photo queries, whose cost is the
    server's image encoder: merged photos go through the ensemble's steps together instead
    of overlapping in them.
    """

    def __init__(self, index_dir: Location | str, embedder: Embedder, *, mmap: bool = False,
                 combine: bool = True, max_combined: int = 64, rounds_in_flight: int = 3):
        for name, value in (("max_combined", max_combined), ("rounds_in_flight", rounds_in_flight)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"Searcher: {name} must be a positive integer, got {value!r}")
        self.index = open_index(index_dir, mmap=mmap, read_only=True)
        self.embedder = embedder
        try:
            # Vectors of two different models are silently meaningless together: refuse.
            self.index.check_fingerprint(embedder.fingerprint)
        except BaseException:
            self.index.close()
            raise
        # One combiner per query kind: each kind has its own ensemble.
        self._combiners = {kind: _Combiner(self._answer, max_combined, rounds_in_flight)
                           for kind in ("text", "image", "text_image")} if combine else None

    def search(self, text: str | None = None, image: bytes | str | Path | None = None, k: int = 10,
               filters: Filters | None = None) -> list[Hit]:
        """Top-k products for one query."""
        k = check_k(k)
        if text is None and image is None:
            raise InputError("a query needs a text, an image or both")
        query = _Query(text, read_image(image) if image is not None else None, k, filters)
        if self._combiners is None:
            return _unwrap(self._answer([query])[0])
        return self._combiners[query.kind](query)

    def search_many(self, texts: Sequence[str] | None = None,
                    images: Sequence[bytes | str | Path] | None = None, k: int = 10,
                    filters: Filters | None = None) -> list[list[Hit]]:
        """Top-k for a batch of queries of one kind (embedded in batched requests)."""
        check_k(k)
        photos = [read_image(i) for i in images] if images is not None else None
        vectors = self.embedder.embed_queries(texts, photos)
        if texts is None:
            return self.index.search_photo(vectors, k, filters)
        return self.index.search(vectors, k, filters)

    def _embed(self, queries: list[_Query]) -> np.ndarray:
        texts = [q.text for q in queries] if queries[0].text is not None else None
        photos = [q.photo for q in queries] if queries[0].photo is not None else None
        return self.embedder.embed_queries(texts, photos)

    def _answer(self, queries: list[_Query]) -> list[list[Hit] | BaseException]:
        """Hits or an error for each query of one kind: one embedding request, one FAISS
        search per distinct (k, filters).  A query the server refuses fails alone."""
        outcomes: list[list[Hit] | BaseException | None] = [None] * len(queries)
        live, vectors, refused = embed_isolating(lambda idx: self._embed([queries[i] for i in idx]),
                                                 len(queries), self.embedder.dim)
        for i, exc in refused.items():
            outcomes[i] = exc
        groups: dict[tuple, list[int]] = {}
        for row, i in enumerate(live):
            groups.setdefault((queries[i].k, _filters_key(queries[i].filters)), []).append(row)
        for (k, _), rows in groups.items():
            members = [live[r] for r in rows]
            # Photo queries: candidates ranked again by the items' photo-side vectors.
            search = self.index.search_photo if queries[members[0]].kind == "image" else self.index.search
            try:
                hits = search(vectors[rows], k, queries[members[0]].filters)
            except Exception as exc:  # noqa: BLE001 - handed to this group's callers
                for i in members:
                    outcomes[i] = exc
                continue
            for i, h in zip(members, hits):
                outcomes[i] = h
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        self.index.close()


def _unwrap(outcome: list[Hit] | BaseException) -> list[Hit]:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def parse_filters(items: Sequence[str]) -> dict[str, list[str]]:
    """``["colour=red", "colour=blue", "category=hat"]`` -> ``{"colour": [...], ...}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise InputError(f"filter {item!r} is not FIELD=VALUE")
        out.setdefault(field.strip(), []).append(value.strip())
    return out
