"""Tests of the catalogue index (FAISS + SQLite) in xmsearch.client.index.

Everything here runs real FAISS and SQLite on temporary directories; crash tests kill a
real child process at chosen points of save().
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from xmsearch.client.index import CatalogIndex, Hit, _omp_threads_at_most, check_embeddings
from xmsearch.errors import IndexStoreError, InputError, XmsearchError

DIM = 256
N_ITEMS = 20_000
N_QUERIES = 200
SMALL_DIM = 32


def clustered(rng: np.random.Generator, centers: np.ndarray, n: int,
              noise: float = 1.2) -> np.ndarray:
    """Unit vectors scattered around random cluster centres (catalogue-like structure)."""
    which = rng.integers(0, len(centers), n)
    x = centers[which] + noise * rng.standard_normal((n, centers.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def unit(rng: np.random.Generator, n: int, dim: int = SMALL_DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def item_meta(i: int) -> dict:
    return {"title": f"product {i}", "image": f"images/{i}.jpg", "brand": f"b{i % 100}",
            "color": f"c{i % 8}", "tags": [f"t{i % 7}", f"u{i % 5}"], "year": 2000 + i % 3}


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ x.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, axis=1), top


def matches(meta: dict, filters: dict) -> bool:
    for field, wanted in filters.items():
        wanted = {str(w) for w in (wanted if isinstance(wanted, list) else [wanted])}
        have = meta.get(field)
        have = {str(h) for h in (have if isinstance(have, list) else [have])}
        if not wanted & have:
            return False
    return True


# --------------------------------------------------------------------------- 20k catalogue


@pytest.fixture(scope="module")
def catalogue():
    rng = np.random.default_rng(1234)
    centers = rng.standard_normal((50, DIM)).astype(np.float32)
    x = clustered(rng, centers, N_ITEMS)
    q = clustered(rng, centers, N_QUERIES)
    ids = [f"sku{i}" for i in range(N_ITEMS)]
    metas = [item_meta(i) for i in range(N_ITEMS)]
    return x, q, ids, metas


@pytest.fixture(scope="module")
def big_indexes(catalogue, tmp_path_factory):
    """Flat, IVF256,Flat (nprobe 16) and HNSW32 (efSearch 64) over the same 20k items."""
    x, _, ids, metas = catalogue
    root = tmp_path_factory.mktemp("big")
    built = {}
    # One OpenMP thread: on a shared, oversubscribed 2-core machine, two spinning threads
    # make HNSW construction about twice as slow.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for name, factory, params in (("flat", "Flat", {}),
                                      ("ivf", "IVF256,Flat", {"nprobe": 16}),
                                      ("hnsw", "HNSW32", {"efSearch": 64})):
            idx = CatalogIndex.create(root / name, DIM, fingerprint="fp-test", factory=factory)
            idx.add(ids, x, metas)
            if params:
                idx.set_search_params(**params)
            idx.save()
            built[name] = idx
    finally:
        faiss.omp_set_num_threads(threads)
    yield built
    for idx in built.values():
        idx.close()


@pytest.mark.slow
def test_flat_search_equals_brute_force(catalogue, big_indexes):
    x, q, ids, _ = catalogue
    scores, rows = brute_force(x, q, 10)
    hits = big_indexes["flat"].search(q, 10)
    assert [[h.id for h in row] for row in hits] == [[ids[i] for i in r] for r in rows]
    got = np.array([[h.score for h in row] for row in hits])
    np.testing.assert_allclose(got, scores, rtol=0, atol=1e-5)


def test_small_searches_limit_faiss_threads_in_the_calling_thread_only():
    # A one-query search runs FAISS on one OpenMP thread (idle ones spin and take a core
    # from the server); other threads, and later calls, keep their own setting.
    seen: dict[str, int] = {}

    def fresh_thread(key: str) -> None:
        t = threading.Thread(target=lambda: seen.__setitem__(key, faiss.omp_get_max_threads()))
        t.start()
        t.join()

    fresh_thread("default")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(4)
    try:
        with _omp_threads_at_most(1):
            seen["one query"] = faiss.omp_get_max_threads()
            fresh_thread("meanwhile elsewhere")
        with _omp_threads_at_most(64):
            seen["64 queries"] = faiss.omp_get_max_threads()
        seen["after"] = faiss.omp_get_max_threads()
    finally:
        faiss.omp_set_num_threads(before)
    assert seen == {"default": seen["default"], "one query": 1, "meanwhile elsewhere": seen["default"],
                    "64 queries": 4, "after": 4}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ivf", "hnsw"])
def test_approximate_recall_against_flat(catalogue, big_indexes, name):
    _, q, _, _ = catalogue
    truth = [{h.id for h in row} for row in big_indexes["flat"].search(q, 10)]
    got = big_indexes[name].search(q, 10)
    recall = np.mean([len({h.id for h in row} & t) / 10 for row, t in zip(got, truth)])
    assert recall >= 0.95, f"{name} recall@10 {recall:.3f}"
    if name == "ivf":
        # The knob is real: one probed list out of 256 loses most neighbours on this data.
        low = big_indexes[name].search(q, 10, nprobe=1)
        low_recall = np.mean([len({h.id for h in row} & t) / 10 for row, t in zip(low, truth)])
        assert low_recall < 0.9 < recall


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("filters", [
    {"brand": "b3", "color": "c3"},                # 100 items, sparse selector
    {"brand": ["b11", "b12"], "tags": "u1"},       # OR within a field, list attribute
    {"color": "c5"},                               # 2500 items, bitmap selector
    {"brand": "b7", "color": "c7", "year": 2001},  # ~33 items, number matched as text
])
def test_filtered_search_returns_exactly_k_matching(catalogue, big_indexes, name, filters):
    x, q, ids, metas = catalogue
    k = 10
    allowed = np.array([i for i, m in enumerate(metas) if matches(m, filters)])
    assert len(allowed) >= k
    hits = big_indexes[name].search(q[:50], k, filters=filters)
    for row in hits:
        assert len(row) == k
        for h in row:
            assert matches(h.metadata, filters), (h.id, h.metadata)
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
    if name == "flat":
        _, rows = brute_force(x[allowed], q[:50], k)
        assert [[h.id for h in row] for row in hits] == [[ids[allowed[i]] for i in r]
                                                         for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flat", "ivf", "hnsw"])
def test_filter_with_fewer_matches_than_k_returns_all_of_them(catalogue, big_indexes, name):
    _, q, ids, metas = catalogue
    filters = {"brand": "b42", "color": "c2", "year": 2002, "tags": "t0"}
    expected = {ids[i] for i, m in enumerate(metas) if matches(m, filters)}
    assert 0 < len(expected) < 10
    for row in big_indexes[name].search(q[:20], 10, filters=filters):
        assert {h.id for h in row} == expected


# --------------------------------------------------------------------------- small indexes


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def make_index(path: Path, rng: np.random.Generator, n: int = 500, factory: str = "Flat",
               fingerprint: str = "fp-A") -> tuple[CatalogIndex, np.ndarray, list[str]]:
    idx = CatalogIndex.create(path, SMALL_DIM, fingerprint=fingerprint, factory=factory)
    x = unit(rng, n)
    ids = [f"sku{i}" for i in range(n)]
    idx.add(ids, x, [item_meta(i) for i in range(n)])
    idx.save()
    return idx, x, ids


def result_ids(hits: list[list[Hit]]) -> list[list[str]]:
    return [[h.id for h in row] for row in hits]


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW32", "SQ8"])
def test_save_open_round_trip_is_identical(tmp_path, rng, factory):
    idx, x, _ = make_index(tmp_path / "i", rng, n=1000, factory=factory)
    if factory.startswith("IVF"):
        idx.set_search_params(nprobe=4)
    if factory.startswith("HNSW"):
        idx.set_search_params(efSearch=24)
    idx.delete(["sku3", "sku5"])
    idx.save()
    q = unit(rng, 20)
    before = idx.search(q, 7)
    before_f = idx.search(q, 7, filters={"color": ["c1", "c2"]})
    params = idx.search_params
    idx.close()
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["count"] == 998 and manifest["search_params"] == params
    assert manifest["fingerprint"] == "fp-A" and manifest["dim"] == SMALL_DIM
    for kwargs in ({}, {"read_only": True}, {"mmap": True}):
        with CatalogIndex.open(tmp_path / "i", **kwargs) as again:
            assert len(again) == 998 and again.search_params == params
            assert again.factory == factory and again.dim == SMALL_DIM
            assert again.search(q, 7) == before
            assert again.search(q, 7, filters={"color": ["c1", "c2"]}) == before_f
            again.verify()


def test_truncated_faiss_file_gives_readable_error(tmp_path, rng):
    idx, _, _ = make_index(tmp_path / "i", rng)
    idx.close()
    (faiss_file,) = (tmp_path / "i").glob("*.faiss")
    data = faiss_file.read_bytes()
    faiss_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexStoreError) as err:
        CatalogIndex.open(tmp_path / "i")
    assert faiss_file.name in str(err.value) and "truncated" in str(err.value)


def test_open_refuses_broken_directories(tmp_path, rng):
    with pytest.raises(IndexStoreError, match="does not exist"):
        CatalogIndex.open(tmp_path / "nowhere")
    idx, _, _ = make_index(tmp_path / "i", rng)
    idx.close()
    manifest_path = tmp_path / "i" / "manifest.json"
    good = manifest_path.read_text()

    manifest = json.loads(good)
    manifest["dim"] = 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexStoreError, match="manifest.json says dim = 64"):
        CatalogIndex.open(tmp_path / "i")

    manifest["dim"], manifest["fingerprint"] = SMALL_DIM, "fp-other"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexStoreError, match="fingerprint = 'fp-other'"):
        CatalogIndex.open(tmp_path / "i", read_only=True)

    manifest_path.write_text("{not json")
    with pytest.raises(IndexStoreError, match="manifest.json is not readable JSON"):
        CatalogIndex.open(tmp_path / "i")

    manifest_path.unlink()
    with pytest.raises(IndexStoreError, match="manifest.json is missing"):
        CatalogIndex.open(tmp_path / "i")
    manifest_path.write_text(good)
    CatalogIndex.open(tmp_path / "i").close()


def test_faiss_file_from_another_save_is_detected(tmp_path, rng):
    idx, _, _ = make_index(tmp_path / "i", rng, n=100)
    old = next((tmp_path / "i").glob("*.faiss")).read_bytes()
    idx.add(["extra"], unit(rng, 1))
    idx.save()
    idx.close()
    (current,) = (tmp_path / "i").glob("*.faiss")
    current.write_bytes(old)
    with pytest.raises(IndexStoreError, match="holds 100 vectors but .* lists 101 items"):
        CatalogIndex.open(tmp_path / "i")


def test_create_refuses_existing_index_and_second_writer(tmp_path, rng):
    idx, _, _ = make_index(tmp_path / "i", rng, n=10)
    with pytest.raises(IndexStoreError, match="already holds an index"):
        CatalogIndex.create(tmp_path / "i", SMALL_DIM, fingerprint="fp-A")
    with pytest.raises(IndexStoreError, match="open for writing elsewhere"):
        CatalogIndex.open(tmp_path / "i")
    with CatalogIndex.open(tmp_path / "i", read_only=True) as reader:
        assert len(reader) == 10
    idx.close()
    CatalogIndex.open(tmp_path / "i").close()


# --------------------------------------------------------------------------- crash safety

CRASH_CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    from xmsearch.client.index import CatalogIndex

    path, point = sys.argv[1], sys.argv[2]
    idx = CatalogIndex.open(path)
    x = np.random.default_rng(99).standard_normal((10, %(dim)d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx.add([f"new{i}" for i in range(10)], x, [{"color": "c0"}] * 10)
    idx.delete(["sku0"])
    real_replace = os.replace

    def crashing_replace(src, dst, *args, **kwargs):
        dst = str(dst)
        if point == "before_faiss_rename" and dst.endswith(".faiss"):
            os._exit(17)
        if point == "before_manifest_rename" and dst.endswith("manifest.json"):
            os._exit(17)
        real_replace(src, dst, *args, **kwargs)
        if point == "after_faiss_rename" and dst.endswith(".faiss"):
            os._exit(17)

    os.replace = crashing_replace
    idx.save()
    os._exit(0)
""" % {"dim": SMALL_DIM})


@pytest.mark.parametrize("point,committed", [("before_faiss_rename", False),
                                             ("after_faiss_rename", False),
                                             ("before_manifest_rename", True)])
def test_crash_during_save_leaves_a_whole_index(tmp_path, rng, point, committed):
    idx, _, ids = make_index(tmp_path / "i", rng, n=200)
    q = unit(rng, 5)
    old_results = idx.search(q, 5)
    idx.close()
    child = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(tmp_path / "i"), point],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 17, child.stderr

    # A reader (no writer lock, no repairs) already sees one whole generation.
    with CatalogIndex.open(tmp_path / "i", read_only=True) as reader:
        reader.verify()
        assert reader.contains(["new0", "sku0"]) == ([True, False] if committed
                                                     else [False, True])
    with CatalogIndex.open(tmp_path / "i") as idx:
        idx.verify()
        if committed:
            assert len(idx) == 209
            new = np.random.default_rng(99).standard_normal((10, SMALL_DIM)).astype(np.float32)
            new /= np.linalg.norm(new, axis=1, keepdims=True)
            assert result_ids(idx.search(new, 1)) == [[f"new{i}"] for i in range(10)]
            assert idx.get(["new3"]) == [{"color": "c0"}]
            manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
            assert manifest["generation"] == idx.generation and manifest["count"] == 209
        else:
            assert len(idx) == 200
            assert idx.search(q, 5) == old_results
            assert idx.get(["sku0"]) == [item_meta(0)]
        # Leftovers of the interrupted save are gone; one FAISS file remains.
        names = sorted(p.name for p in (tmp_path / "i").iterdir())
        assert [n for n in names if n.endswith(".faiss")] == [f"vectors.{idx.generation}.faiss"]
        assert not [n for n in names if n.endswith(".tmp")]
        # ... and the index keeps working.
        idx.add(["later"], unit(rng, 1))
    with CatalogIndex.open(tmp_path / "i", mmap=True) as idx:
        assert idx.contains(["later"]) == [True]


def test_failed_save_keeps_previous_generation_and_can_be_retried(tmp_path, rng, monkeypatch):
    idx, _, _ = make_index(tmp_path / "i", rng, n=50)
    idx.add(["new"], unit(rng, 1))
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".faiss"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(IndexStoreError, match="could not write .*vectors.3.faiss.*intact"):
        idx.save()
    with CatalogIndex.open(tmp_path / "i", read_only=True) as reader:
        assert len(reader) == 50 and reader.contains(["new"]) == [False]
        reader.verify()
    monkeypatch.setattr(os, "replace", real_replace)
    idx.save()
    idx.close()
    with CatalogIndex.open(tmp_path / "i") as again:
        assert len(again) == 51 and again.contains(["new"]) == [True]


def test_close_without_save_discards_changes(tmp_path, rng):
    idx, _, _ = make_index(tmp_path / "i", rng, n=20)
    idx.add(["gone"], unit(rng, 1))
    idx.delete(["sku1"])
    idx.close()
    with pytest.raises(IndexStoreError, match="is closed"):
        idx.search(unit(rng, 1), 1)
    with CatalogIndex.open(tmp_path / "i") as idx:
        assert idx.contains(["gone", "sku1"]) == [False, True]
        idx.verify()


# --------------------------------------------------------------------------- add / delete


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW16"])
def test_add_delete_duplicates_and_unknown_ids(tmp_path, rng, factory):
    idx, x, ids = make_index(tmp_path / "i", rng, n=400, factory=factory)
    with pytest.raises(InputError, match=r"ids \['a'\] appear more than once"):
        idx.add(["a", "b", "a"], unit(rng, 3))
    with pytest.raises(InputError, match=r"ids \['sku1', 'sku2'\] are already in"):
        idx.add(["sku1", "fresh", "sku2"], unit(rng, 3))
    assert idx.contains(["fresh"]) == [False] and len(idx) == 400

    with pytest.raises(InputError, match=r"ids \['nope'\] are not in"):
        idx.delete(["sku4", "nope"])
    assert idx.contains(["sku4"]) == [True]
    assert idx.delete(["sku4", "nope"], missing_ok=True) == 1
    assert idx.contains(["sku4", "sku5"]) == [False, True] and len(idx) == 399
    with pytest.raises(InputError, match="not in index"):
        idx.get(["sku4"])
    # A deleted item is never returned, even for its own vector.
    for row in idx.search(x[4:5], 10):
        assert "sku4" not in {h.id for h in row}
    assert idx.search(x[4:5], 399)[0].__len__() == 399
    assert all(h.id != "sku4" for h in idx.search(x[4:5], 10, filters={"brand": "b4"})[0])

    # upsert replaces the vector and the metadata.
    new_vec = unit(rng, 1)
    idx.add(["sku7"], new_vec, [{"title": "replaced", "color": "zz"}], upsert=True)
    assert idx.get(["sku7"]) == [{"title": "replaced", "color": "zz"}]
    top = idx.search(new_vec, 1)[0][0]
    assert top.id == "sku7" and top.score == pytest.approx(1.0, abs=1e-5)
    assert [h.id for h in idx.search(new_vec, 5, filters={"color": "zz"})[0]] == ["sku7"]
    assert idx.search(new_vec, 5, filters={"color": "c7"})[0][0].id != "sku7"
    assert len(idx) == 399
    idx.save()
    idx.verify()
    expected_tombstones = 2 if factory.startswith("HNSW") else 0
    assert idx.tombstone_count == expected_tombstones
    idx.close()
    with CatalogIndex.open(tmp_path / "i") as again:
        again.verify()
        assert len(again) == 399 and again.contains(["sku4", "sku7"]) == [False, True]


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_photo_vectors_rank_photo_queries_again(tmp_path, rng, factory):
    n, depth = 300, 50
    idx = CatalogIndex.create(tmp_path / "p", SMALL_DIM, fingerprint="fp-A", factory=factory,
                              photo_vectors=True)
    x, photo = unit(rng, n), unit(rng, n)
    ids = [f"sku{i}" for i in range(n)]
    with pytest.raises(InputError, match="pass photo_vectors"):
        idx.add(ids, x)
    with pytest.raises(InputError, match="photo_vectors"):
        idx.add(ids, x, photo_vectors=photo[:, :8])
    with pytest.raises(InputError, match="300 ids but 299 photo vectors"):
        idx.add(ids, x, photo_vectors=photo[:-1])
    assert len(idx) == 0
    idx.add(ids, x, [item_meta(i) for i in range(n)], photo_vectors=photo)
    assert idx.has_photo_vectors

    def expected(q: np.ndarray, k: int, allowed=None) -> list[list[str]]:
        out = []
        for qv in q:
            order = [i for i in np.argsort(-(x @ qv), kind="stable") if allowed is None or i in allowed]
            cand = order[:max(k, depth)]
            out.append([ids[i] for i in sorted(cand, key=lambda i: -(photo[i] @ qv))[:k]])
        return out

    q = unit(rng, 6)
    got = idx.search_photo(q, 5, depth=depth)
    if factory == "Flat":  # exact candidates: the same lists as ranking by hand
        assert result_ids(got) == expected(q, 5)
    for qv, row in zip(q, got):  # the score is the photo-side cosine, best first
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True)
        for h in row:
            assert h.score == pytest.approx(float(photo[int(h.id[3:])] @ qv), abs=1e-5)
    # Not the order of the main vectors: the photo-side ranking decides.
    assert result_ids(got) != result_ids(idx.search(q, 5))
    with pytest.raises(InputError, match="depth"):
        idx.search_photo(q, 5, depth=0)
    with pytest.raises(InputError, match=r"search_photo\(\): k must be a positive integer"):
        idx.search_photo(q, 0)
    assert idx.search_photo(q, 5, filters={"color": "no-such"}) == [[] for _ in q]
    # Filters hold.
    rows = idx.search_photo(q, 10, filters={"color": "c3"})
    assert all(len(r) == 10 and all(h.metadata["color"] == "c3" for h in r) for r in rows)
    if factory == "Flat":
        allowed = {i for i in range(n) if i % 8 == 3}
        assert result_ids(rows) == expected(q, 10, allowed)
    # A deleted item leaves both stores; an upsert replaces its photo-side vector too.
    idx.delete(["sku1"])
    assert all("sku1" not in {h.id for h in r} for r in idx.search_photo(np.stack([x[1]]), 20))
    new_photo = unit(rng, 1)
    idx.add(["sku2"], x[2:3], [{"title": "again"}], upsert=True, photo_vectors=new_photo)
    top = idx.search_photo(new_photo, 1, depth=n)[0][0]
    assert top.id == "sku2" and top.score == pytest.approx(1.0, abs=1e-5)
    before = result_ids(idx.search_photo(q, 5))
    idx.save()
    idx.verify()
    idx.close()
    with CatalogIndex.open(tmp_path / "p", read_only=True) as again:
        assert again.has_photo_vectors and len(again) == n - 1
        assert result_ids(again.search_photo(q, 5)) == before
        assert again.search_photo(new_photo, 1, depth=n)[0][0].id == "sku2"

    # verify() notices an item whose photo-side vector went missing.
    with sqlite3.connect(tmp_path / "p" / "catalog.sqlite") as conn:
        conn.execute("DELETE FROM photo_vectors WHERE label = (SELECT label FROM items WHERE id = 'sku5')")
    with CatalogIndex.open(tmp_path / "p", read_only=True) as broken:
        with pytest.raises(IndexStoreError, match="without a photo-side vector"):
            broken.verify()


def test_index_without_photo_vectors_searches_photo_queries_as_any_other(tmp_path, rng):
    idx, x, ids = make_index(tmp_path / "i", rng, n=200)
    assert not idx.has_photo_vectors
    q = unit(rng, 4)
    assert result_ids(idx.search_photo(q, 7)) == result_ids(idx.search(q, 7))
    with pytest.raises(InputError, match="created without photo-side vectors"):
        idx.add(["new"], unit(rng, 1), photo_vectors=unit(rng, 1))
    idx.close()

    # An index written before photo-side vectors existed: no meta key, no table.
    with sqlite3.connect(tmp_path / "i" / "catalog.sqlite") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'photo_vectors'")
        conn.execute("DROP TABLE photo_vectors")
    with CatalogIndex.open(tmp_path / "i") as old:
        assert not old.has_photo_vectors
        old.delete(["sku3"])
        old.add(["new"], unit(rng, 1), [{"title": "new"}])
        assert result_ids(old.search_photo(q, 7)) == result_ids(old.search(q, 7))
        assert old.contains(["sku3", "new"]) == [False, True]
    with CatalogIndex.open(tmp_path / "i", read_only=True) as again:
        again.verify()
        assert len(again) == 200


def test_metadata_round_trip_and_filter_semantics(tmp_path, rng):
    idx = CatalogIndex.create(tmp_path / "i", SMALL_DIM, fingerprint="fp-A")
    metas = [
        {"title": "red shoe", "image": "a.jpg", "color": "red", "brand": "acme", "sale": True},
        {"title": "blue shoe", "color": "blue", "brand": "acme", "sizes": [40, 41]},
        {"title": "red hat", "color": "red", "brand": "other", "price": 9.5},
        {"color": ["red", "blue"], "brand": "acme", "nested": {"a": 1}},
        {},
    ]
    ids = ["p0", "p1", "p2", "p3", "p4"]
    x = unit(rng, 5)
    idx.add(ids, x, metas)
    assert idx.get(["p3", "p0", "p4"]) == [metas[3], metas[0], metas[4]]
    assert idx.contains(["p1", "zz", "p4"]) == [True, False, True]
    assert idx.filter_fields() == ["brand", "color", "price", "sale", "sizes"]

    def found(filters):
        return {h.id for h in idx.search(x[:1], 5, filters=filters)[0]}

    for filters in ({"color": "red"}, {"color": ["red", "blue"], "brand": "acme"},
                    {"brand": "acme", "color": "blue"}, {"sizes": 41}, {"sale": True},
                    {"price": 9.5}, {"color": "green"}, {"unknown_field": "x"}):
        expected = {i for i, m in zip(ids, metas) if matches(
            {k: (json.dumps(v) if isinstance(v, bool) else v) for k, v in m.items()},
            {k: (json.dumps(v) if isinstance(v, bool) else v) for k, v in filters.items()})}
        assert found(filters) == expected, filters
    hit = idx.search(x[:1], 1)[0][0]
    assert hit == Hit(id="p0", score=pytest.approx(1.0, abs=1e-5), label=hit.label,
                      metadata=metas[0])
    with pytest.raises(InputError, match="filters must be a dict"):
        idx.search(x[:1], 5, filters=["color", "red"])
    with pytest.raises(InputError, match="empty value list"):
        idx.search(x[:1], 5, filters={"color": []})
    with pytest.raises(InputError, match="must be a string"):
        idx.search(x[:1], 5, filters={"color": [None]})
    with pytest.raises(InputError, match="must be a dict"):
        idx.add(["q"], unit(rng, 1), ["not a dict"])
    with pytest.raises(InputError, match="'title' of id 'q' must be a string"):
        idx.add(["q"], unit(rng, 1), [{"title": 3}])
    with pytest.raises(InputError, match="not JSON-serialisable"):
        idx.add(["q"], unit(rng, 1), [{"weight": float("nan")}])
    with pytest.raises(InputError, match="different id"):
        idx.add(["q"], unit(rng, 1), [{"id": "other"}])
    idx.close()


def test_vector_validation(tmp_path, rng):
    idx = CatalogIndex.create(tmp_path / "i", SMALL_DIM, fingerprint="fp-A")
    good = unit(rng, 2)
    with pytest.raises(InputError, match=r"2-D array.*wrap it as v\[None, :\]"):
        idx.add(["a"], good[0])
    with pytest.raises(InputError, match="dimension 16 does not match the index dimension 32"):
        idx.add(["a", "b"], good[:, :16])
    with pytest.raises(InputError, match="dtype <U"):
        idx.add(["a"], np.array([["x"] * SMALL_DIM]))
    bad = good.copy()
    bad[1, 3] = np.nan
    with pytest.raises(InputError, match=r"rows \[1\] contain NaN"):
        idx.add(["a", "b"], bad)
    with pytest.raises(InputError, match="L2 norms .*normalize=True"):
        idx.add(["a", "b"], good * 3)
    with pytest.raises(InputError, match="zero vectors"):
        idx.add(["a"], np.zeros((1, SMALL_DIM)), normalize=True)
    with pytest.raises(InputError, match="2 ids but 1 vectors"):
        idx.add(["a", "b"], good[:1])
    with pytest.raises(InputError, match="one string 'a'"):
        idx.add("a", good[:1])
    with pytest.raises(InputError, match="not non-empty strings"):
        idx.add(["a", ""], good)
    with pytest.raises(InputError, match="1 ids but 2 metadata"):
        idx.add(["a"], good[:1], [{}, {}])
    assert len(idx) == 0
    # float64 and unnormalised input are accepted when asked for.
    idx.add(["a", "b"], (good * 3).astype(np.float64), normalize=True)
    assert idx.search(good[:1].astype(np.float16), 1)[0][0].id == "a"
    for k in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="k must be a positive integer"):
            idx.search(good, k)
    with pytest.raises(InputError, match="dimension 31"):
        idx.search(good[:, :31], 1)
    with pytest.raises(InputError, match="nprobe applies to IVF"):
        idx.set_search_params(nprobe=8)
    with pytest.raises(InputError, match="efSearch applies to HNSW"):
        idx.search(good, 1, efSearch=8)
    assert idx.search(np.zeros((0, SMALL_DIM), np.float32), 3) == []
    out = check_embeddings(good.astype(np.float64) * (1 + 1e-4), SMALL_DIM)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    for exc_type in (InputError,):
        assert issubclass(exc_type, XmsearchError) and issubclass(exc_type, ValueError)
    idx.close()


def test_create_validates_arguments(tmp_path):
    with pytest.raises(InputError, match="FAISS cannot build factory 'IVFbogus'"):
        CatalogIndex.create(tmp_path / "a", 8, fingerprint="f", factory="IVFbogus")
    with pytest.raises(InputError, match="drop the IDMap prefix"):
        CatalogIndex.create(tmp_path / "b", 8, fingerprint="f", factory="IDMap2,Flat")
    with pytest.raises(InputError, match="metric 'l2' is not supported"):
        CatalogIndex.create(tmp_path / "c", 8, fingerprint="f", metric="l2")
    with pytest.raises(InputError, match="fingerprint"):
        CatalogIndex.create(tmp_path / "d", 8, fingerprint="")
    with pytest.raises(InputError, match="dim must be a positive integer"):
        CatalogIndex.create(tmp_path / "e", 0, fingerprint="f")
    with pytest.raises(InputError, match="photo_views must be an integer from 0 to 16, got 17"):
        CatalogIndex.create(tmp_path / "f", 8, fingerprint="f", photo_vectors=True, photo_views=17)
    with pytest.raises(InputError, match="photo_views=2 averages re-shots .* keeps none"):
        CatalogIndex.create(tmp_path / "g", 8, fingerprint="f", photo_views=2)
    assert not any((tmp_path / name).exists() for name in "abcdefg")


def test_photo_views_setting_is_kept_with_the_index(tmp_path):
    CatalogIndex.create(tmp_path / "v", 8, fingerprint="f", photo_vectors=True, photo_views=3).close()
    with CatalogIndex.open(tmp_path / "v", read_only=True) as idx:
        assert idx.photo_views == 3 and idx.has_photo_vectors
    with CatalogIndex.create(tmp_path / "plain", 8, fingerprint="f") as idx:
        assert idx.photo_views == 0 and not idx.alt_titles
    CatalogIndex.create(tmp_path / "t", 8, fingerprint="f", alt_titles=True).close()
    with CatalogIndex.open(tmp_path / "t", read_only=True) as idx:
        assert idx.alt_titles
    with pytest.raises(InputError, match="alt_titles must be True or False, got 1"):
        CatalogIndex.create(tmp_path / "u", 8, fingerprint="f", alt_titles=1)
    assert not (tmp_path / "u").exists()


def test_fingerprint_mismatch_is_refused(tmp_path, rng):
    idx, _, _ = make_index(tmp_path / "i", rng, n=5, fingerprint="sha256:aaaa")
    idx.check_fingerprint("sha256:aaaa")
    with pytest.raises(IndexStoreError) as err:
        idx.check_fingerprint("sha256:bbbb")
    message = str(err.value)
    assert str(tmp_path / "i") in message
    assert "model fingerprint sha256:aaaa, server has sha256:bbbb" in message
    assert "re-index or point at the right server" in message
    idx.close()


def test_training_requirements(tmp_path, rng):
    idx = CatalogIndex.create(tmp_path / "i", SMALL_DIM, fingerprint="f", factory="IVF64,Flat")
    assert idx.needs_training and idx.training_size == (64, 64 * 39)
    # Too few vectors: a clear error, no crash, nothing stored.
    with pytest.raises(InputError, match=r"only 100 vectors .*at least 64.* recommends 2496"):
        idx.add([f"a{i}" for i in range(100)], unit(rng, 100))
    with pytest.raises(InputError, match="needs at least 64 training vectors .*got 30"):
        idx.train(unit(rng, 30))
    assert idx.needs_training and len(idx) == 0
    # Enough in the first add: trained on the spot.
    x = unit(rng, 2500)
    idx.add([f"a{i}" for i in range(2500)], x)
    assert not idx.needs_training and len(idx) == 2500
    with pytest.raises(InputError, match="already trained"):
        idx.train(x)
    idx.save()
    idx.close()

    small = CatalogIndex.create(tmp_path / "j", SMALL_DIM, fingerprint="f", factory="IVF64,Flat")
    small.train(unit(rng, 200))  # explicit training accepts the minimum (logs a warning)
    small.add(["only"], unit(rng, 1))
    assert small.search(unit(rng, 1), 5)[0][0].id == "only"
    small.close()

    flat = CatalogIndex.create(tmp_path / "k", SMALL_DIM, fingerprint="f")
    assert not flat.needs_training
    flat.train(unit(rng, 3))  # no-op for factories without training
    flat.close()


def test_mmap_open_is_read_only(tmp_path, rng):
    for factory in ("IVF16,Flat", "Flat"):
        path = tmp_path / factory.replace(",", "_")
        idx, x, _ = make_index(path, rng, n=800, factory=factory)
        expected = idx.search(x[:5], 4)
        idx.close()
        with CatalogIndex.open(path, mmap=True) as mapped:
            assert mapped.read_only
            assert mapped.search(x[:5], 4) == expected
            for call in (lambda: mapped.add(["n"], unit(rng, 1)),
                         lambda: mapped.delete(["sku1"]),
                         lambda: mapped.train(x),
                         mapped.save):
                with pytest.raises(IndexStoreError, match="opened read-only"):
                    call()
            assert len(mapped) == 800


def test_concurrent_searches_while_adding(tmp_path, rng):
    idx, _, _ = make_index(tmp_path / "i", rng, n=1000)
    batches = [unit(rng, 100) for _ in range(20)]
    queries = unit(rng, 64)
    errors: list[BaseException] = []
    done = threading.Event()
    searches = [0] * 8

    def searcher(n: int) -> None:
        local = np.random.default_rng(n)
        try:
            while not done.is_set():
                q = queries[local.integers(0, len(queries), 4)]
                filters = {"color": "c1"} if n % 2 else None
                for row in idx.search(q, 5, filters=filters):
                    assert len(row) == 5
                    assert all(h.metadata.get("color") == "c1" for h in row) or filters is None
                searches[n] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        for b, vectors in enumerate(batches):
            ids = [f"new{b}_{i}" for i in range(100)]
            idx.add(ids, vectors, [{"color": "c1"}] * 100)
            idx.delete(ids[:10])
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    assert all(count > 0 for count in searches)
    assert len(idx) == 1000 + 20 * 90
    idx.save()
    idx.verify()
    idx.close()


def test_to_gpu_without_gpu_says_what_is_needed(tmp_path, rng):
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible; the no-GPU message cannot be provoked")
    idx, _, _ = make_index(tmp_path / "i", rng, n=5)
    with pytest.raises(IndexStoreError, match="faiss-gpu with a visible GPU is needed.*gpu extra"):
        idx.to_gpu()
    idx.close()
    with pytest.raises(IndexStoreError, match="faiss-gpu with a visible GPU is needed"):
        CatalogIndex.create(tmp_path / "g", 8, fingerprint="f", gpu=True)


GPU_MISSING = not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING, reason="needs faiss-gpu (the gpu extra) and a visible NVIDIA GPU")
@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_gpu_search_matches_cpu(tmp_path, rng, factory):
    idx, x, _ = make_index(tmp_path / "i", rng, n=2000, factory=factory)
    if factory.startswith("IVF"):
        idx.set_search_params(nprobe=16)  # all lists: CPU and GPU must then agree exactly
    q = unit(rng, 32)
    cpu = idx.search(q, 10)
    idx.to_gpu()
    assert idx.on_gpu
    gpu = idx.search(q, 10)
    assert result_ids(gpu) == result_ids(cpu)
    np.testing.assert_allclose([[h.score for h in r] for r in gpu],
                               [[h.score for h in r] for r in cpu], atol=1e-4)
    # Filtered searches and writes still work; the GPU copy follows the writes.
    assert all(h.metadata["color"] == "c2" for h in idx.search(q, 5, filters={"color": "c2"})[0])
    idx.add(["gpu-new"], q[:1])
    assert idx.search(q[:1], 1)[0][0].id == "gpu-new"
    idx.save()
    idx.close()
    with CatalogIndex.open(tmp_path / "i") as cpu_again:
        assert cpu_again.search(q[:1], 1)[0][0].id == "gpu-new"
