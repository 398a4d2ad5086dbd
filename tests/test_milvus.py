"""MilvusIndex against a real Milvus (Milvus Lite, in a local file) and against CatalogIndex.

The directory index (FAISS Flat + SQLite) is the reference: the same items, vectors and
metadata put into both must give the same hits, scores, metadata and photo rankings, under
every kind of filter.  The refusals are the directory index's, and a refused call must
leave the collection as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xmsearch.client.milvus import DEFAULT_COLLECTION, MAX_ID_BYTES, MAX_K, MilvusIndex, MilvusLocation
from xmsearch.client.stores import create_index, index_exists, open_index, parse_location
from xmsearch.errors import IndexStoreError, InputError

pymilvus = pytest.importorskip("pymilvus", reason="pymilvus is part of the test extra")

DIM = 24
N = 240
COLOURS = ["red", "blue", "green", "navy blue"]


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _items(rng: np.random.Generator, n: int = N, prefix: str = "item"):
    ids = [f"{prefix}-{i}" for i in range(n)]
    metas = [{"title": f"title {i}", "image": f"images/{i}.jpg", "colour": COLOURS[i % 4],
              "sizes": ["S", "M"] if i % 2 else ["L"], "price": round(i * 1.25, 2), "sale": i % 5 == 0,
              # a value that would end a naive expression: must be stored and matched as text
              "note": '"] or true or ["' if i % 7 == 0 else "plain"}
             for i in range(n)]
    return ids, _unit(rng, n), metas, _unit(rng, n)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """The same catalogue in a Milvus collection and in a directory index."""
    root = tmp_path_factory.mktemp("milvus")
    ids, x, metas, photo = _items(np.random.default_rng(0))
    m = create_index(f"milvus:{root / 'items.db'}#items", DIM, fingerprint="fp-1", photo_vectors=True)
    d = create_index(root / "dir", DIM, fingerprint="fp-1", photo_vectors=True)
    for idx in (m, d):
        idx.add(ids, x, metas, photo_vectors=photo)
        idx.save()
    yield m, d
    m.close()
    d.close()


def _queries(n: int = 6, seed: int = 1) -> np.ndarray:
    return _unit(np.random.default_rng(seed), n)


FILTERS = [None, {"colour": "red"}, {"colour": ["red", "navy blue"], "sizes": "M"}, {"price": 2.5},
           {"sale": True}, {"note": '"] or true or ["'}, {"colour": "purple"}]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: json.dumps(f))
@pytest.mark.parametrize("photo", [False, True], ids=["search", "search_photo"])
def test_hits_equal_the_directory_index(pair, filters, photo: bool) -> None:
    m, d = pair
    q = _queries()
    k = 12
    got = (m.search_photo if photo else m.search)(q, k, filters)
    want = (d.search_photo if photo else d.search)(q, k, filters)
    assert len(got) == len(want) == len(q)
    for g, w in zip(got, want):
        assert [h.id for h in g] == [h.id for h in w]
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
        assert [h.metadata for h in g] == [h.metadata for h in w]
    if filters == {"note": '"] or true or ["'}:  # every 7th item, nothing else
        assert got[0] and all(int(h.id.split("-")[1]) % 7 == 0 for h in got[0])
    if filters == {"colour": "purple"}:
        assert got == [[] for _ in q]


def test_fewer_matches_than_k_return_every_match(pair) -> None:
    m, _ = pair
    hits = m.search(_queries(1), 50, {"price": [0.0, 1.25, 2.5]})[0]
    assert sorted(h.id for h in hits) == ["item-0", "item-1", "item-2"]


def test_eval_reads_the_top_grade_items_attributes_from_either_store(pair) -> None:
    # xmsearch eval's miss table asks the index for the metadata of each query's top-grade
    # items; ids the index does not hold are left out, not an error.
    from xmsearch import evaluate as ev

    queries = [{"qid": "q1", "kind": "text", "relevant": {"item-4": 2, "item-8": 2, "item-1": 1}},
               {"qid": "q2", "kind": "image", "relevant": {"item-2": 2, "gone": 2}}]
    m, d = pair
    got = ev.top_grade_metadata(m, queries)
    assert got == ev.top_grade_metadata(d, queries) and sorted(got) == ["item-2", "item-4", "item-8"]
    rows = {r["qid"]: r for r in ev.per_query_rows({"q1": ["item-1", "item-4"], "q2": ["item-6", "item-2"]},
                                                   queries, metadata={**got, **dict(zip(["item-1", "item-6"],
                                                                                        m.get(["item-1", "item-6"])))})}
    assert rows["q1"]["asked"] == {"colour": got["item-4"]["colour"], "note": "plain"}
    assert rows["q1"]["results"][0]["off"] == ["colour"]  # item-1 has the next colour


def test_reads_match(pair) -> None:
    m, d = pair
    assert len(m) == len(d) == N
    assert m.contains(["item-3", "nope", "item-3"]) == [True, False, True]
    assert m.get(["item-5", "item-0"]) == d.get(["item-5", "item-0"])
    with pytest.raises(InputError, match=r"\['nope'\] are not in index"):
        m.get(["item-1", "nope"])
    assert m.dim == DIM and m.has_photo_vectors and not m.needs_training
    m.check_fingerprint("fp-1")
    with pytest.raises(IndexStoreError, match="fp-2"):
        m.check_fingerprint("fp-2")


@pytest.mark.parametrize("call,match", [
    (lambda m, x, p: m.add(["a", "a"], np.vstack([x, x]), photo_vectors=np.vstack([p, p])), "more than once"),
    (lambda m, x, p: m.add(["item-1"], x, photo_vectors=p), "already in index"),
    (lambda m, x, p: m.add(["a"], x[:, :-1], photo_vectors=p), "dimension 23"),
    (lambda m, x, p: m.add(["a"], 3 * x, photo_vectors=p), "L2 norms"),
    (lambda m, x, p: m.add(["a"], np.full_like(x, np.nan), photo_vectors=p), "NaN"),
    (lambda m, x, p: m.add(["a"], x), "photo_vectors"),
    (lambda m, x, p: m.add(["a", "b"], np.vstack([x, x]), photo_vectors=p), "photo vectors"),
    (lambda m, x, p: m.add([""], x, photo_vectors=p), "non-empty strings"),
    (lambda m, x, p: m.add(["a"], x, ["not a dict"], photo_vectors=p), "must be a dict"),
    (lambda m, x, p: m.add(["a"], x, [{"title": 3}], photo_vectors=p), "must be a string"),
    (lambda m, x, p: m.add(["é" * MAX_ID_BYTES], x, photo_vectors=p), "bytes in UTF-8"),
    (lambda m, x, p: m.add(["a"], x, [{"blob": "x" * 70_000}], photo_vectors=p), "bytes as JSON"),
    (lambda m, x, p: m.add(["a"], x, [{"tags": [str(i) for i in range(2000)]}], photo_vectors=p),
     "attribute values"),
    (lambda m, x, p: m.search(x, MAX_K + 1), "limit"),
    (lambda m, x, p: m.search(x, 0), "positive integer"),
    (lambda m, x, p: m.search(x[:, :5], 3), "dimension 5"),
    (lambda m, x, p: m.search(x, 3, {"colour": []}), "empty value list"),
    (lambda m, x, p: m.search(x, 3, {"colour": {"a": 1}}), "must be a string"),
    (lambda m, x, p: m.search(x, 3, "colour=red"), "must be a dict"),
    (lambda m, x, p: m.delete(["item-1", "nope"]), r"\['nope'\] are not in index"),
])
def test_bad_calls_are_refused_and_change_nothing(pair, call, match: str) -> None:
    m, _ = pair
    rng = np.random.default_rng(5)
    x, p = _unit(rng, 1), _unit(rng, 1)
    before = m.search(_queries(2), 5)
    with pytest.raises(InputError, match=match):
        call(m, x, p)
    assert len(m) == N
    assert [[h.id for h in r] for r in m.search(_queries(2), 5)] == [[h.id for h in r] for r in before]


def test_writes_reopen_and_read_only(tmp_path: Path) -> None:
    loc = f"milvus:{tmp_path / 'w.db'}"
    ids, x, metas, _ = _items(np.random.default_rng(2), 30)
    assert not index_exists(loc)
    with create_index(loc, DIM, fingerprint="fp") as m:
        assert m.path == MilvusLocation(str(tmp_path / "w.db"), DEFAULT_COLLECTION)
        m.add(ids, x, metas)
        assert m.delete(["item-3", "item-4", "item-3"]) == 2
        assert m.delete(["item-3", "gone"], missing_ok=True) == 0
        new = _unit(np.random.default_rng(3), 1)
        m.add(["item-5"], new, [{"title": "replaced"}], upsert=True)
        assert m.search_photo(new, 1)[0][0].id == "item-5"  # no photo vectors: plain search
    assert index_exists(loc)
    with pytest.raises(IndexStoreError, match="already exists"):
        create_index(loc, DIM, fingerprint="fp")
    r = open_index(loc, read_only=True)
    try:
        assert len(r) == 28 and r.contains(["item-3", "item-5"]) == [False, True]
        assert r.get(["item-5"]) == [{"title": "replaced"}]
        hit = r.search(new, 1)[0][0]
        assert hit.id == "item-5" and hit.score == pytest.approx(1.0, abs=1e-5) and hit.label == -1
        for write in (lambda: r.add(["z"], new), lambda: r.delete(["item-1"]), r.save):
            with pytest.raises(IndexStoreError, match="read-only"):
                write()
    finally:
        r.close()
    with pytest.raises(IndexStoreError, match="closed"):
        r.search(new, 1)
    assert r.photo_views == 0
    views = f"milvus:{tmp_path / 'v.db'}"
    with pytest.raises(InputError, match="photo_views=2 averages re-shots .* keeps none"):
        create_index(views, DIM, fingerprint="fp", photo_views=2)
    assert not index_exists(views)
    create_index(views, DIM, fingerprint="fp", photo_vectors=True, photo_views=2, alt_titles=True).close()
    with open_index(views, read_only=True) as m:
        assert m.photo_views == 2 and m.has_photo_vectors and m.alt_titles
    assert not r.alt_titles
    with pytest.raises(InputError, match="alt_titles must be True or False, got 'on'"):
        create_index(f"milvus:{tmp_path / 't.db'}", DIM, fingerprint="fp", alt_titles="on")
    assert not index_exists(f"milvus:{tmp_path / 't.db'}")


def test_open_refuses_what_is_not_an_xmsearch_collection(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with pytest.raises(IndexStoreError, match="does not exist"):
        open_index(f"milvus:{db}#nothing_here")
    client = pymilvus.MilvusClient(str(db))
    try:
        client.create_collection("foreign", dimension=DIM)
    finally:
        client.close()
    with pytest.raises(IndexStoreError, match="not made by xmsearch"):
        open_index(f"milvus:{db}#foreign")
    with pytest.raises(IndexStoreError, match="cannot connect to Milvus"):
        MilvusIndex.open("milvus:http://127.0.0.1:9#items")


def test_locations_and_factories(tmp_path: Path) -> None:
    assert parse_location("milvus:http://host:19530#shop_1") == MilvusLocation("http://host:19530", "shop_1")
    assert str(parse_location("milvus:items.db")) == f"milvus:items.db#{DEFAULT_COLLECTION}"
    assert parse_location("some/dir") == Path("some/dir")
    assert parse_location(Path("milvus:x")) == Path("milvus:x")  # a Path is always a directory
    for bad in ("milvus:", "milvus:x.db#1abc", "milvus:x.db#a-b", "milvus:x.db#sp ace"):
        with pytest.raises(InputError):
            parse_location(bad)
    loc = f"milvus:{tmp_path / 'f.db'}"
    with pytest.raises(InputError, match="FAISS index"):
        create_index(loc, DIM, fingerprint="fp", factory="IVF16,Flat")
    with pytest.raises(InputError, match="GPU"):
        create_index(loc, DIM, fingerprint="fp", gpu=True)
    with pytest.raises(InputError, match="GPU"):
        open_index(loc, gpu=True)
    with create_index(loc, DIM, fingerprint="fp") as m:
        assert m.factory == "milvus:FLAT"
    with open_index(loc) as again:
        assert isinstance(again, MilvusIndex)


def test_cli_keeps_the_uri_whole() -> None:
    from xmsearch.client.cli import _location

    assert _location("milvus:http://host:19530#items") == "milvus:http://host:19530#items"
    assert _location("demo/index") == Path("demo/index")
