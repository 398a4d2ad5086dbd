"""``Searcher``: concurrent single queries answered together, each caller its own answer.

The combining itself (``_Combiner``) is exercised first on its own, with a plain function as
the answer, where rounds can be forced and counted; then ``Searcher`` against a real
tritonserver and FAISS index, where every answer of a merged round must equal the one the
same query gets alone, and a bad query must fail only its own caller.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from xmsearch.client.search import Searcher, _Combiner
from xmsearch.errors import InputError


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the callers to queue")
        time.sleep(0.002)


def _call_all(fn, args: list, *, timeout: float = 120.0) -> list:
    """``fn(arg)`` on one thread per arg, all started together; outcomes (result or error) in order."""
    out: list = [None] * len(args)
    start = threading.Barrier(len(args))

    def work(i: int) -> None:
        start.wait()
        try:
            out[i] = fn(args[i])
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a caller never got its answer"
    return out


def _call_in_background(fn, arg):
    """Start ``fn(arg)`` on a thread; returns a function that joins it and gives its result."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn(arg)))
    t.start()

    def result():
        t.join(120)
        assert box, "the background caller never got its answer"
        return box[0]

    return result


class Gate:
    """Holds every round until all ``total`` queries are in a held round or queued behind one,
    so that what follows is one merged round; open for good after that."""

    def __init__(self, combiner: _Combiner, total: int):
        self.combiner, self.total = combiner, total
        self.held = 0
        self.opened = False
        self._lock = threading.Lock()

    def __call__(self, rows: int) -> None:
        if self.opened:
            return
        with self._lock:
            self.held += rows
        _wait_until(lambda: self.held + len(self.combiner._pending) >= self.total)
        self.opened = True


# --------------------------------------------------------------------------- the combiner alone


def test_combiner_merges_waiting_callers_and_answers_each_its_own() -> None:
    rounds: list[list[int]] = []
    active = [0, 0]  # rounds in progress now, most at once

    def answer(queries: list[int]) -> list[int]:
        active[0] += 1
        active[1] = max(active[1], active[0])
        gate(len(queries))
        rounds.append(list(queries))
        time.sleep(0.01)
        active[0] -= 1
        return [q * 10 for q in queries]

    combiner = _Combiner(answer, max_rows=8, max_leaders=1)
    gate = Gate(combiner, total=20)
    answers = _call_all(combiner, list(range(20)))
    assert answers == [q * 10 for q in range(20)]
    assert sorted(q for r in rounds for q in r) == list(range(20))  # each query answered once
    assert max(len(r) for r in rounds) == 8  # the waiting callers went together, up to max_rows
    assert len(rounds) <= 1 + 3  # the held first round, then at most ceil(19 / 8) merged ones
    assert active[1] == 1  # never more rounds at once than max_leaders
    assert combiner._leaders == 0 and not combiner._pending


def test_a_failed_round_fails_its_callers_only_and_the_combiner_keeps_going() -> None:
    def answer(queries: list[str]) -> list[str]:
        gate(len(queries))
        if "bad" in queries:
            raise InputError("round refused: a bad query")
        return [q.upper() for q in queries]

    combiner = _Combiner(answer, max_rows=64, max_leaders=1)
    gate = Gate(combiner, total=6)
    first = _call_in_background(combiner, "first")
    _wait_until(lambda: gate.held == 1)  # its round is held: the others queue behind it
    errors = _call_all(combiner, ["a", "b", "bad", "c", "d"])
    assert first() == "FIRST"
    assert all(isinstance(e, InputError) and str(e) == "round refused: a bad query" for e in errors)
    assert len({id(e) for e in errors}) == len(errors)  # each caller raises its own copy
    assert combiner._leaders == 0 and not combiner._pending
    assert combiner("later") == "LATER"  # no leader slot was lost with the failed round


def test_combiner_under_churn_answers_every_call_exactly_once() -> None:
    rng = random.Random(0)
    lock = threading.Lock()
    seen: list[int] = []

    def answer(queries: list[int]) -> list[int]:
        with lock:
            seen.extend(queries)
            pause = rng.random() * 0.002
        time.sleep(pause)
        return [-q for q in queries]

    combiner = _Combiner(answer, max_rows=5, max_leaders=2)
    per_thread = 150
    results = _call_all(lambda t: [combiner(t * per_thread + i) for i in range(per_thread)], list(range(16)))
    for t, got in enumerate(results):
        assert got == [-(t * per_thread + i) for i in range(per_thread)]
    assert sorted(seen) == list(range(16 * per_thread))
    assert combiner._leaders == 0 and not combiner._pending


# --------------------------------------------------------------------------- through the server


@pytest.fixture(scope="module")
def served_index(xm_server, served_demo_index):
    from xmsearch.catalog import read_catalog
    from xmsearch.client.embed import Embedder

    demo, index_dir = served_demo_index
    embedder = Embedder(xm_server.url, timeout_s=120.0, retries=3)
    rows, _ = read_catalog(demo / "catalog.jsonl")
    yield index_dir, embedder, rows
    embedder.close()


def _spy_on_requests(searcher: Searcher, gate: Callable[[int], None]) -> list[int]:
    """Count the rows of each embedding request the searcher sends (the real method runs)."""
    sizes: list[int] = []
    real = searcher.embedder.embed_queries

    def counted(texts=None, images=None, **kw):
        rows = len(texts if texts is not None else images)
        gate(rows)
        sizes.append(rows)
        return real(texts, images, **kw)

    searcher.embedder.embed_queries = counted
    return sizes


def _same_hits(got, want) -> None:
    assert [h.id for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-4)


@pytest.mark.triton
def test_concurrent_searches_get_the_answers_they_get_alone(served_index) -> None:
    index_dir, embedder, rows = served_index
    queries = [(r.title, (3, 5, 10)[i % 3], {"colour": r.attributes["colour"]} if i % 4 == 0 else None)
               for i, r in enumerate(rows[:18])]
    alone = Searcher(index_dir, embedder, combine=False)
    try:
        want = [alone.search(text=t, k=k, filters=f) for t, k, f in queries]
    finally:
        alone.close()
    searcher = Searcher(index_dir, embedder)
    try:
        sizes = _spy_on_requests(searcher, Gate(searcher._combiners["text"], total=len(queries)))
        got = _call_all(lambda q: searcher.search(text=q[0], k=q[1], filters=q[2]), queries)
    finally:
        del searcher.embedder.embed_queries  # the instance attribute: the real method is back
        searcher.close()
    for (title, k, f), g, w in zip(queries, got, want):
        assert not isinstance(g, BaseException), g
        assert len(g) == len(w) and len(g) <= k
        _same_hits(g, w)
        if f is not None:
            assert all(h.metadata["colour"] == f["colour"] for h in g)
    # Each query sent once; at most three held rounds (three leaders), then one for all the rest.
    assert sum(sizes) == len(queries) and len(sizes) <= 4


@pytest.mark.triton
def test_a_bad_photo_or_filter_fails_only_its_own_caller(served_index) -> None:
    index_dir, embedder, rows = served_index
    photos = [r.image.read_bytes() for r in rows[:6]]
    corrupt = bytes(random.Random(3).randrange(256) for _ in range(2000))
    alone = Searcher(index_dir, embedder, combine=False)
    try:
        want = [alone.search(image=p, k=5) for p in photos]
        with pytest.raises(InputError) as alone_err:
            alone.search(image=corrupt, k=5)
    finally:
        alone.close()
    searcher = Searcher(index_dir, embedder)
    try:
        sizes = _spy_on_requests(searcher, Gate(searcher._combiners["image"], total=len(photos) + 1))
        got = _call_all(lambda p: searcher.search(image=p, k=5), [photos[0], *photos[1:3], corrupt, *photos[3:]])
        # A filter FAISS cannot use fails its caller; the others of the round still get hits.
        texts = [r.title for r in rows[6:10]]
        bad_filter = ["colour"]
        mixed = _call_all(lambda a: searcher.search(text=a[0], k=5, filters=a[1]),
                          [(texts[0], None), (texts[1], bad_filter), (texts[2], None), (texts[3], None)])
    finally:
        del searcher.embedder.embed_queries
        searcher.close()
    err = got.pop(3)
    assert isinstance(err, InputError) and "IMAGE" in str(err), err
    assert str(err) == str(alone_err.value)  # the message it gets when sent alone
    assert max(sizes) > 1  # the photos did go in a merged request first
    for g, w in zip(got, want):
        assert not isinstance(g, BaseException), g
        _same_hits(g, w)
    assert isinstance(mixed[1], InputError) and "filters" in str(mixed[1])
    assert all(isinstance(m, list) and len(m) == 5 for i, m in enumerate(mixed) if i != 1)


@pytest.mark.triton
def test_bad_arguments_are_refused_before_any_request(served_index) -> None:
    index_dir, embedder, _ = served_index
    with pytest.raises(InputError, match="max_combined"):
        Searcher(index_dir, embedder, max_combined=0)
    with pytest.raises(InputError, match="rounds_in_flight"):
        Searcher(index_dir, embedder, rounds_in_flight=True)
    searcher = Searcher(index_dir, embedder)
    try:
        sizes = _spy_on_requests(searcher, lambda rows: None)
        for k in (0, -1, True, "5", 2.5):
            with pytest.raises(InputError, match="k must be a positive integer"):
                searcher.search(text="red hat", k=k)
        with pytest.raises(InputError, match="a text, an image or both"):
            searcher.search()
        with pytest.raises(InputError, match="nope.jpg"):
            searcher.search(image=Path("nope.jpg"))
        assert sizes == []
    finally:
        del searcher.embedder.embed_queries
        searcher.close()
