"""Catalogue ingestion through a real tritonserver (the exported cpu repository).

A small generated catalogue (40 products) gets five planted bad rows: three that the
catalogue reader refuses (missing photo file, empty title, duplicate id) and two only
the server can find (random bytes saved as .jpg, a JPEG cut in half).  Every test checks
that the good rows end up in the index, each under its own vector, and that the bad
ones are reported with their line numbers.

Vectors are compared through FAISS itself: the index's committed ``vectors.<G>.faiss``
file (named in its manifest) is read and each item's vector reconstructed by the label
its search hit carries.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from xmsearch import spec as S
from xmsearch.catalog import read_catalog
from xmsearch.client.embed import Embedder
from xmsearch.client.index import CatalogIndex
from xmsearch.client.ingest import IngestReport, ingest_catalog
from xmsearch.client.search import Searcher
from xmsearch.demo import generate_demo_catalog
from xmsearch.errors import IndexStoreError, InputError
from xmsearch.reshoot import photo_views

pytestmark = pytest.mark.triton

N_ITEMS = 40


@dataclass
class Catalogue:
    path: Path
    good: dict[str, str]  # id -> title, for every row that must be indexed
    bad: dict[int, str]  # line -> what was planted there


def _plant(root: Path) -> Catalogue:
    """Interleave five bad rows with the 40 good ones; return what each line should give."""
    lines = (root / "catalog.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(x) for x in lines]
    images = root / "images"
    rng = random.Random(7)
    (images / "corrupt.jpg").write_bytes(bytes(rng.randrange(256) for _ in range(3000)))
    whole = (images / "p000005.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    planted = [  # (insert before good row i, row, label)
        (3, {"id": "bad-missing-photo", "title": "red cap", "image": "images/nope.jpg"}, "missing"),
        (10, {"id": "bad-corrupt", "title": "green tote", "image": "images/corrupt.jpg"}, "corrupt"),
        (17, {"id": "bad-empty-title", "title": " ", "image": "images/p000001.jpg"}, "empty title"),
        (25, {**rows[4], "title": "a second p000004"}, "duplicate"),
        (33, {"id": "bad-truncated", "title": "blue boots", "image": "images/truncated.jpg"},
         "truncated"),
    ]
    out: list[dict] = []
    bad: dict[int, str] = {}
    for i, row in enumerate(rows):
        for before, extra, label in planted:
            if before == i:
                out.append(extra)
                bad[len(out)] = label  # 1-based line number of the row just written
        out.append(row)
    path = root / "catalog.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    return Catalogue(path, {r["id"]: r["title"] for r in rows}, bad)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    root = tmp_path_factory.mktemp("catalogue")
    generate_demo_catalog(root, n=N_ITEMS, seed=0, n_queries=0)
    return _plant(root)


@pytest.fixture(scope="module")
def embedder(xm_server) -> Embedder:
    emb = Embedder(xm_server.url, timeout_s=120.0, retries=3)
    yield emb
    emb.close()


@pytest.fixture(scope="module")
def fresh_vectors(catalogue: Catalogue, embedder: Embedder) -> dict[str, np.ndarray]:
    """Fresh item vectors of the good rows around each planted bad row, and the ends.

    Those are the rows a misaligned fallback (a bad row dropped from the chunk, its
    neighbours shifted) would store under the wrong id.
    """
    rows, _ = read_catalog(catalogue.path)
    near = {line + d for line in catalogue.bad for d in (-1, 1)}
    rows = [r for i, r in enumerate(rows)
            if r.id in catalogue.good and (r.line in near or i in (0, len(rows) - 1))]
    vecs = embedder.embed_items([r.title for r in rows], [r.image.read_bytes() for r in rows])
    return {r.id: v for r, v in zip(rows, vecs)}


@pytest.fixture(scope="module")
def reference_index(catalogue: Catalogue, embedder: Embedder,
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, IngestReport]:
    """One uninterrupted Flat ingest, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("reference") / "index"
    return out, ingest_catalog(catalogue.path, out, embedder, chunk_size=8)


def stored_vectors(index_dir: Path) -> dict[str, np.ndarray]:
    """id -> vector as committed on disk (FAISS file of the manifest's generation)."""
    manifest = json.loads((index_dir / "manifest.json").read_text())
    vectors = faiss.read_index(str(index_dir / manifest["faiss_file"]))
    with CatalogIndex.open(index_dir, read_only=True) as idx:
        n = len(idx)
        probe = np.zeros((1, idx.dim), np.float32)
        probe[0, 0] = 1.0
        hits = idx.search(probe, n)[0]  # every item, each with its FAISS label
    assert len(hits) == n
    return {h.id: vectors.reconstruct(h.label) for h in hits}


def stored_photo_vectors(index_dir: Path) -> dict[str, np.ndarray]:
    """id -> photo-side vector as stored beside the item's metadata."""
    with CatalogIndex.open(index_dir, read_only=True) as idx:
        hits = idx.search(np.eye(1, idx.dim, dtype=np.float32), len(idx))[0]
        found, vectors = idx._photo_vectors_of(np.array([h.label for h in hits]))
    return {h.id: vectors[np.searchsorted(found, h.label)] for h in hits}


def assert_report_lists_planted_rows(report: IngestReport, cat: Catalogue) -> None:
    assert {b.line for b in report.bad} == set(cat.bad), [str(b) for b in report.bad]
    by_line = {b.line: b for b in report.bad}
    for line, label in cat.bad.items():
        reason = by_line[line].reason
        if label == "missing":
            assert "nope.jpg" in reason and "does not exist" in reason
        elif label == "empty title":
            assert reason == "empty title"
        elif label == "duplicate":
            assert by_line[line].id == "p000004" and "duplicate id" in reason
        else:  # the server's own refusal comes back as the reason
            assert reason.startswith("refused by the server"), reason
            assert "IMAGE" in reason and ("corrupt" in reason or "not a decodable" in reason), reason
    assert report.rows == len(cat.good) + len(cat.bad)


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_ingest_keeps_good_rows_reports_bad_ones(catalogue: Catalogue, embedder: Embedder,
                                                 fresh_vectors: dict[str, np.ndarray],
                                                 reference_index, tmp_path: Path, factory: str) -> None:
    if factory == "Flat":
        out, report = reference_index
    else:
        out = tmp_path / "index"
        report = ingest_catalog(catalogue.path, out, embedder, factory=factory, chunk_size=8)
    assert report.added == N_ITEMS and report.already_indexed == 0
    assert_report_lists_planted_rows(report, catalogue)

    good = sorted(catalogue.good)
    with CatalogIndex.open(out, read_only=True) as idx:
        assert idx.factory == factory
        assert idx.fingerprint == embedder.fingerprint
        assert len(idx) == N_ITEMS
        assert all(idx.contains(good))
        assert not any(idx.contains(["bad-missing-photo", "bad-corrupt", "bad-empty-title",
                                     "bad-truncated"]))
        # Items sit under their own vectors: a fresh embedding finds its item first.
        assert len(fresh_vectors) >= 8
        probes = np.stack(list(fresh_vectors.values()))
        for item_id, hits in zip(fresh_vectors, idx.search(probes, 3)):
            assert hits[0].id == item_id
            assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        # The metadata came along (the duplicate row at line 26 did not overwrite it).
        meta = idx.get(["p000004"])[0]
        assert meta["title"] == catalogue.good["p000004"]
        assert meta["category"] and meta["colour"]

    # Searchable through the server by text: every title returns k ranked results.
    searcher = Searcher(out, embedder)
    try:
        results = searcher.search_many([catalogue.good[i] for i in good], k=5)
        assert all(len(hits) == 5 for hits in results)
        assert all(h.id in catalogue.good for hits in results for h in hits)
        assert all(hits[0].score >= hits[-1].score for hits in results)

        # Photo queries are ranked again by the items' photo-side vectors, which the ingest
        # stored from the item ensemble's second output: a hit's score is that cosine.
        assert embedder.serves_photo_vectors and searcher.index.has_photo_vectors
        rows = {r.id: r for r in read_catalog(catalogue.path)[0]}
        probe = [rows[i] for i in good[:4]]
        photos = [r.image.read_bytes() for r in probe]
        both = embedder.embed_items([r.title for r in probe], photos, photo=True)
        assert both.shape == (4, 2 * embedder.dim)
        queries = embedder.embed_queries(images=photos)
        for r, q, photo_side, hits in zip(probe, queries, both[:, embedder.dim:],
                                          searcher.search_many(images=photos, k=3)):
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            assert hits[0].id == r.id
            assert hits[0].score == pytest.approx(float(q @ photo_side), abs=1e-4)
    finally:
        searcher.close()


class Interrupt(Exception):
    pass


def stop_after(chunks: int):
    """A progress callback that interrupts the ingest after its ``chunks``-th chunk, as if
    the process died right after adding (and, with save_every=1, saving) it."""
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == chunks:
            raise Interrupt

    return progress


@pytest.mark.slow
def test_interrupted_ingest_resumes_to_the_same_index(catalogue: Catalogue, embedder: Embedder,
                                                      reference_index, tmp_path: Path) -> None:
    out = tmp_path / "index"
    with pytest.raises(Interrupt):
        ingest_catalog(catalogue.path, out, embedder, chunk_size=8, save_every=1, progress=stop_after(3))
    # What was saved before the interruption is on disk, whole.
    with CatalogIndex.open(out, read_only=True) as idx:
        partial = len(idx)
        assert idx.generation > 1
    rows, _ = read_catalog(catalogue.path)
    assert partial == len([r for r in rows[:24] if r.id in catalogue.good])

    with pytest.raises(IndexStoreError, match="--resume"):
        ingest_catalog(catalogue.path, out, embedder, chunk_size=8)

    report = ingest_catalog(catalogue.path, out, embedder, chunk_size=8, resume=True)
    assert report.already_indexed == partial
    assert report.added == N_ITEMS - partial
    assert_report_lists_planted_rows(report, catalogue)

    resumed, reference = stored_vectors(out), stored_vectors(reference_index[0])
    assert sorted(resumed) == sorted(reference) == sorted(catalogue.good)
    for item_id, vec in reference.items():
        np.testing.assert_allclose(resumed[item_id], vec, atol=1e-5, err_msg=item_id)

    # Resuming a complete index adds nothing and embeds nothing.
    again = ingest_catalog(catalogue.path, out, embedder, resume=True)
    assert again.added == 0 and again.already_indexed == N_ITEMS


def test_ingest_into_milvus_resumes_and_answers_as_the_directory_index(
        catalogue: Catalogue, embedder: Embedder, reference_index, tmp_path: Path) -> None:
    """The same stream into a Milvus collection (Milvus Lite): interrupted, resumed, and
    then the same vectors, photo-side vectors and search answers as the directory index."""
    pymilvus = pytest.importorskip("pymilvus", reason="pymilvus is part of the test extra")
    db = tmp_path / "items.db"
    loc = f"milvus:{db}#items"
    with pytest.raises(Interrupt):
        ingest_catalog(catalogue.path, loc, embedder, chunk_size=8, progress=stop_after(2))
    with pytest.raises(IndexStoreError, match="--resume"):
        ingest_catalog(catalogue.path, loc, embedder, chunk_size=8)
    report = ingest_catalog(catalogue.path, loc, embedder, chunk_size=8, resume=True)
    rows, _ = read_catalog(catalogue.path)
    # Milvus keeps each chunk once it is added (no separate save): two chunks were in.
    assert report.already_indexed == len([r for r in rows[:16] if r.id in catalogue.good])
    assert report.added + report.already_indexed == N_ITEMS
    assert_report_lists_planted_rows(report, catalogue)

    reference_dir = reference_index[0]
    reference = stored_vectors(reference_dir)
    reference_photo = stored_photo_vectors(reference_dir)
    client = pymilvus.MilvusClient(str(db))
    try:
        stored = client.get("items", ids=sorted(catalogue.good), output_fields=["vector", "photo"])
    finally:
        client.close()
    assert sorted(r["id"] for r in stored) == sorted(reference) == sorted(catalogue.good)
    for r in stored:
        np.testing.assert_allclose(r["vector"], reference[r["id"]], atol=1e-5, err_msg=r["id"])
        np.testing.assert_allclose(r["photo"], reference_photo[r["id"]], atol=1e-5, err_msg=r["id"])

    good = sorted(catalogue.good)
    photos = [r.image.read_bytes() for r in rows if r.id in good[:4]]
    colour = rows[0].metadata()["colour"]
    answers = {}
    for where in (loc, reference_dir):
        searcher = Searcher(where, embedder)
        try:
            answers[str(where)] = [*searcher.search_many([catalogue.good[i] for i in good[:6]], k=5),
                                   *searcher.search_many(images=photos, k=3),
                                   searcher.search(text="red", k=5, filters={"colour": colour})]
        finally:
            searcher.close()
    got, want = answers[loc], answers[str(reference_dir)]
    assert len(got) == len(want) == 11 and all(got)
    for g, w in zip(got, want):
        assert [h.id for h in g] == [h.id for h in w]
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
        assert [h.metadata for h in g] == [h.metadata for h in w]


@pytest.mark.slow
@pytest.mark.parametrize("request_rows,in_flight,chunk_size", [(1, 1, 5), (3, 32, 8), (16, 4, 7)])
def test_request_stream_shape_leaves_the_index_unchanged(catalogue: Catalogue, embedder: Embedder,
                                                        reference_index, tmp_path: Path, request_rows: int,
                                                        in_flight: int, chunk_size: int) -> None:
    """One request at a time, many small ones in flight across chunk ends, requests larger
    than a chunk: the same items under the same vectors, chunks added and reported in order."""
    out = tmp_path / "index"
    progress: list[int] = []
    report = ingest_catalog(catalogue.path, out, embedder, chunk_size=chunk_size, save_every=1,
                            request_rows=request_rows, in_flight=in_flight,
                            progress=lambda done, total: progress.append(done))
    assert report.added == N_ITEMS
    assert_report_lists_planted_rows(report, catalogue)
    readable, _ = read_catalog(catalogue.path)  # the rows sent to the server
    total = len(readable)
    assert progress == [*range(chunk_size, total, chunk_size), total]
    streamed, reference = stored_vectors(out), stored_vectors(reference_index[0])
    assert sorted(streamed) == sorted(reference)
    for item_id, vec in reference.items():
        np.testing.assert_allclose(streamed[item_id], vec, atol=1e-5, err_msg=item_id)
    with CatalogIndex.open(out, read_only=True) as idx:  # stored in catalogue order
        labels = {h.id: h.label for h in idx.search(np.eye(1, idx.dim, dtype=np.float32), N_ITEMS)[0]}
    good_in_order = [r.id for r in readable if r.id in catalogue.good]
    assert sorted(good_in_order, key=labels.__getitem__) == good_in_order


def test_photo_views_average_reshots_into_the_photo_side_vectors(catalogue: Catalogue, embedder: Embedder,
                                                                 reference_index, tmp_path: Path) -> None:
    """photo_views=2: the searched vectors are the plain ingest's; each photo-side vector is
    normalise(p + normalise(e1 + e2)), p the plain one and e_k the served photo embedding of
    the k-th re-shot of the item's photo (seeded by its id).  The count is recorded: an
    interrupted ingest resumed without it ends where an uninterrupted one does, and another
    count is refused without a change."""
    whole = tmp_path / "whole"
    report = ingest_catalog(catalogue.path, whole, embedder, chunk_size=8, photo_views=2)
    assert report.added == N_ITEMS
    assert_report_lists_planted_rows(report, catalogue)
    plain_dir = reference_index[0]
    searched, plain_searched = stored_vectors(whole), stored_vectors(plain_dir)
    assert sorted(searched) == sorted(plain_searched)
    for item_id, vec in plain_searched.items():
        np.testing.assert_allclose(searched[item_id], vec, atol=1e-5, err_msg=item_id)
    plain, viewed = stored_photo_vectors(plain_dir), stored_photo_vectors(whole)
    rows = {r.id: r for r in read_catalog(catalogue.path)[0]}
    for item_id in sorted(catalogue.good)[:6]:
        shots = photo_views(rows[item_id].image.read_bytes(), item_id, 2)
        e = embedder.embed_queries(images=shots).sum(0)
        want = plain[item_id] + e / np.linalg.norm(e)
        np.testing.assert_allclose(viewed[item_id], want / np.linalg.norm(want), atol=1e-5, err_msg=item_id)
    moved = [float(viewed[i] @ plain[i]) for i in catalogue.good]
    assert max(moved) < 0.9999 and min(moved) > 0.5  # every item's vector moved, none far
    with CatalogIndex.open(whole, read_only=True) as idx:
        assert idx.photo_views == 2

    for count in (0, 3):
        with pytest.raises(IndexStoreError, match=f"built with 2 photo views per item, not {count}"):
            ingest_catalog(catalogue.path, whole, embedder, resume=True, photo_views=count)

    parts = tmp_path / "parts"
    with pytest.raises(Interrupt):
        ingest_catalog(catalogue.path, parts, embedder, chunk_size=8, save_every=1, photo_views=2,
                       progress=stop_after(2))
    resumed = ingest_catalog(catalogue.path, parts, embedder, chunk_size=8, resume=True)
    assert resumed.already_indexed > 0 and resumed.added + resumed.already_indexed == N_ITEMS
    again = stored_photo_vectors(parts)
    for item_id, vec in viewed.items():
        np.testing.assert_allclose(again[item_id], vec, atol=1e-5, err_msg=item_id)
    unchanged = stored_photo_vectors(whole)  # the refused resumes changed nothing
    assert unchanged.keys() == viewed.keys()
    assert all(np.array_equal(unchanged[i], viewed[i]) for i in viewed)


def test_a_photo_that_cannot_be_reshot_keeps_its_photo_side_vector(catalogue: Catalogue, embedder: Embedder,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """with_photo_views on its own: a row whose photo bytes do not decode keeps the photo-side
    vector it came with (logged by line and id); the others get the re-shots' formula."""
    from xmsearch.client.ingest import with_photo_views

    rows = read_catalog(catalogue.path)[0]
    good = [r for r in rows if r.id in catalogue.good][:2]
    photos = [good[0].image.read_bytes(), b"\xff\xd8 not a whole JPEG", good[1].image.read_bytes()]
    trio = [good[0], good[1], good[1]]
    given = np.random.default_rng(0).normal(size=(3, embedder.dim)).astype(np.float32)
    given /= np.linalg.norm(given, axis=1, keepdims=True)
    with caplog.at_level("WARNING", logger="xmsearch.client.ingest"):
        out = with_photo_views(embedder, trio, photos, given, 2)
    np.testing.assert_array_equal(out[1], given[1])
    assert f"line {good[1].line} ({good[1].id}): photo kept without re-shots" in caplog.text
    assert "photo is not a decodable image" in caplog.text
    for k in (0, 2):
        e = embedder.embed_queries(images=photo_views(photos[k], trio[k].id, 2)).sum(0)
        want = given[k] + e / np.linalg.norm(e)
        np.testing.assert_allclose(out[k], want / np.linalg.norm(want), atol=1e-5)
    assert not np.shares_memory(out, given)


def test_alt_titles_mix_each_items_other_titles_into_its_vector(catalogue: Catalogue, embedder: Embedder,
                                                                 reference_index, tmp_path: Path) -> None:
    """alt_titles=True: each searched vector is normalise(v + ALT_TITLE_WEIGHT * normalise(t_1 +
    ... + t_n)), v the plain ingest's and t_k the served text-query embedding of the item's k-th
    other title; photo-side vectors are the plain ones.  The setting is recorded: a resume
    without it keeps it, the other one is refused without a change."""
    from xmsearch.catalog import alt_titles
    from xmsearch.client.ingest import ALT_TITLE_WEIGHT

    out = tmp_path / "titles"
    report = ingest_catalog(catalogue.path, out, embedder, chunk_size=8, alt_titles=True)
    assert report.added == N_ITEMS
    plain_dir = reference_index[0]
    plain, mixed = stored_vectors(plain_dir), stored_vectors(out)
    assert sorted(plain) == sorted(mixed)
    rows = {r.id: r for r in read_catalog(catalogue.path)[0]}
    with_alts = [i for i in sorted(catalogue.good) if alt_titles(rows[i])]
    assert len(with_alts) >= 6
    for item_id in with_alts[:6]:
        e = embedder.embed_queries(texts=alt_titles(rows[item_id])).sum(0)
        want = plain[item_id] + ALT_TITLE_WEIGHT * e / np.linalg.norm(e)
        np.testing.assert_allclose(mixed[item_id], want / np.linalg.norm(want), atol=1e-5, err_msg=item_id)
    assert all(float(mixed[i] @ plain[i]) < 0.9999 for i in with_alts)
    photo_plain, photo_mixed = stored_photo_vectors(plain_dir), stored_photo_vectors(out)
    assert all(np.allclose(photo_mixed[i], photo_plain[i], atol=1e-6) for i in photo_plain)
    with CatalogIndex.open(out, read_only=True) as idx:
        assert idx.alt_titles
    with pytest.raises(IndexStoreError, match="built with the items' other titles"):
        ingest_catalog(catalogue.path, out, embedder, resume=True, alt_titles=False)
    again = ingest_catalog(catalogue.path, out, embedder, resume=True)
    assert again.added == 0 and again.already_indexed == N_ITEMS
    assert stored_vectors(out).keys() == mixed.keys()


def test_an_other_title_the_server_refuses_is_left_out(embedder: Embedder, catalogue: Catalogue,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from xmsearch.catalog import CatalogRow
    from xmsearch.client.ingest import ALT_TITLE_WEIGHT, mix_in, with_alt_titles

    image = read_catalog(catalogue.path)[0][0].image
    rows = [CatalogRow(7, "long", "red cap", image, {"alt_titles": ["rode pet", "x" * 5000, " ", 3]}),
            CatalogRow(8, "none", "blue cap", image, {})]
    given = np.eye(2, embedder.dim, dtype=np.float32)
    with caplog.at_level("WARNING", logger="xmsearch.client.ingest"):
        out = with_alt_titles(embedder, rows, given)
    assert "line 7 (long): other title 'xxxx" in caplog.text and "left out" in caplog.text
    want = mix_in(given, [0], embedder.embed_queries(texts=["rode pet"]), ALT_TITLE_WEIGHT)
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_array_equal(out[1], given[1])  # no other titles: unchanged


@pytest.mark.parametrize("count", [-1, 17, True, 2.0])
def test_bad_photo_view_counts_are_refused(catalogue: Catalogue, embedder: Embedder, tmp_path: Path,
                                           count) -> None:
    with pytest.raises(InputError, match=f"photo_views must be an integer from 0 to 16, got {count!r}"):
        ingest_catalog(catalogue.path, tmp_path / "index", embedder, photo_views=count)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("setting", [1, "yes"])
def test_a_bad_alt_titles_setting_is_refused(catalogue: Catalogue, embedder: Embedder, tmp_path: Path,
                                             setting) -> None:
    with pytest.raises(InputError, match=f"ingest: alt_titles must be True or False, got {setting!r}"):
        ingest_catalog(catalogue.path, tmp_path / "index", embedder, alt_titles=setting)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("option", ["chunk_size", "save_every", "request_rows", "in_flight"])
def test_ingest_options_below_one_are_refused(catalogue: Catalogue, embedder: Embedder, tmp_path: Path,
                                              option: str) -> None:
    with pytest.raises(InputError, match=f"{option} must be at least 1, got 0"):
        ingest_catalog(catalogue.path, tmp_path / "index", embedder, **{option: 0})
    assert not (tmp_path / "index").exists()


def _manifest_generation(index_dir: Path) -> int:
    try:
        return int(json.loads((index_dir / "manifest.json").read_text())["generation"])
    except (OSError, ValueError, KeyError):
        return 0  # not written yet, or caught between write and rename


@pytest.mark.slow
def test_ingest_killed_midway_resumes_from_the_command_line(catalogue: Catalogue, exported_repository: Path,
                                                            start_triton, reference_index, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 of `xmsearch index` right after its first chunk save, then `--resume`.

    A private server: the kill cancels the client's in-flight gRPC calls, and tritonserver
    2.51 (the newest on PyPI, in nvidia-pytriton 0.7.0) can crash with SIGSEGV when a
    cancellation races a response (triton-inference-server/server#7368, fixed by #7840 in
    24.12).  That server bug must not take the session's shared server, and every test after
    this one, with it; if it strikes, the server is restarted (what a supervisor or a
    Kubernetes liveness probe does) and the resume is checked against the new one.
    """
    out = tmp_path / "index"
    with start_triton(exported_repository) as server:
        # 45 rows in chunks of 2, saved every 4 chunks: saves at 8, 16, ... rows, so the kill
        # lands with most of the catalogue still to do.
        proc = subprocess.Popen([sys.executable, "-m", "xmsearch.cli", "index", str(catalogue.path),
                                 "--out", str(out), "--url", server.url, "--chunk-size", "2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 120
            while _manifest_generation(out) < 2 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, f"ingest ended before the kill: {proc.stderr.read().decode()}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        with CatalogIndex.open(out, read_only=True) as idx:
            partial = len(idx)
        assert 0 < partial < N_ITEMS

        from xmsearch.cli import main

        def restart_if_crashed() -> bool:
            if server.is_running():
                return False
            warnings.warn("tritonserver 2.51 crashed on the killed client's cancelled calls "
                          f"(triton-inference-server/server#7368); restarted it. Log: {server.log_file}")
            server.stop()
            server.start(wait=True, timeout=120)
            return True

        time.sleep(1.0)  # a crash on the cancelled calls usually shows within milliseconds...
        restart_if_crashed()
        code = main(["index", str(catalogue.path), "--out", str(out), "--url", server.url, "--resume"])
        if code != 0 and restart_if_crashed():  # ...but it has come later (a CI run, 2026-12-07)
            with CatalogIndex.open(out, read_only=True) as idx:
                partial = len(idx)  # whatever the failed resume saved stays
            code = main(["index", str(catalogue.path), "--out", str(out), "--url", server.url, "--resume"])
        assert code == 0
    assert f"{N_ITEMS - partial} items added, {partial} already indexed" in capsys.readouterr().out
    resumed, reference = stored_vectors(out), stored_vectors(reference_index[0])
    assert sorted(resumed) == sorted(reference)
    for item_id, vec in reference.items():
        np.testing.assert_allclose(resumed[item_id], vec, atol=1e-5, err_msg=item_id)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_ingest_survives_a_server_restart(catalogue: Catalogue, exported_repository: Path,
                                          start_triton, reference_index, tmp_path: Path) -> None:
    """The server goes away after the first chunk and comes back on the same ports."""
    out = tmp_path / "index"
    with start_triton(exported_repository) as server:
        # Enough retries (backoff capped at 1 s) to outlast a restart of a busy server.
        emb = Embedder(server.url, timeout_s=120.0, retries=240, max_backoff_s=1.0)
        first_chunk_done, server_stopped = threading.Event(), threading.Event()
        chunks: list[int] = []

        def progress(done: int, total: int) -> None:
            chunks.append(done)
            if len(chunks) == 1:
                first_chunk_done.set()
                # The next chunk must meet the stopped server, not race the stop.
                assert server_stopped.wait(120)

        result: dict = {}

        def run() -> None:
            try:
                result["report"] = ingest_catalog(catalogue.path, out, emb, chunk_size=8,
                                                  save_every=1, progress=progress)
            except BaseException as exc:  # handed to the main thread
                result["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        try:
            assert first_chunk_done.wait(180), "the first chunk never finished"
            # Stop and restart from this (the main) thread: the server is bound to the
            # thread that started it (die_with_parent).
            server.stop()
            server_stopped.set()
            time.sleep(1)
            server.start(wait=True, timeout=240)
        finally:
            server_stopped.set()
            worker.join(600)
        emb.close()
    assert not worker.is_alive()
    if "error" in result:
        raise result["error"]
    report = result["report"]
    assert report.added == N_ITEMS
    assert_report_lists_planted_rows(report, catalogue)
    assert len(chunks) > 1
    restarted, reference = stored_vectors(out), stored_vectors(reference_index[0])
    assert sorted(restarted) == sorted(reference)  # nothing lost, nothing twice
    for item_id, vec in reference.items():
        np.testing.assert_allclose(restarted[item_id], vec, atol=1e-5, err_msg=item_id)


def test_existing_index_needs_resume_or_add(catalogue: Catalogue, embedder: Embedder,
                                            tmp_path: Path) -> None:
    out = tmp_path / "index"
    CatalogIndex.create(out, embedder.dim, fingerprint=embedder.fingerprint).close()
    with pytest.raises(IndexStoreError) as err:
        ingest_catalog(catalogue.path, out, embedder)
    msg = str(err.value)
    assert str(out) in msg and "already exists" in msg and "--resume" in msg and "--add" in msg
    with pytest.raises(IndexStoreError, match="--add needs an existing index"):
        ingest_catalog(catalogue.path, tmp_path / "none", embedder, add=True)


@pytest.mark.slow
def test_add_reports_ids_already_in_the_index(catalogue: Catalogue, embedder: Embedder,
                                              tmp_path: Path) -> None:
    root = catalogue.path.parent
    rows = [json.loads(x) for x in catalogue.path.read_text(encoding="utf-8").splitlines()]
    first = tmp_path / "first.jsonl"
    more = tmp_path / "more.jsonl"
    new = {**rows[0], "id": "new-item"}
    # Image paths are relative to the catalogue file: make them absolute in these copies.
    lines = [{**r, "image": str(root / r["image"])} for r in (rows[0], new, rows[2])]
    more.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    first.write_text("".join(json.dumps({**r, "image": str(root / r["image"])}) + "\n"
                             for r in rows[:3]), encoding="utf-8")
    out = tmp_path / "index"
    assert ingest_catalog(first, out, embedder).added == 3
    report = ingest_catalog(more, out, embedder, add=True)
    assert report.added == 1
    assert [(b.line, b.id) for b in report.bad] == [(1, rows[0]["id"]), (3, rows[2]["id"])]
    assert all("already in the index" in b.reason for b in report.bad)
    with CatalogIndex.open(out, read_only=True) as idx:
        assert len(idx) == 4 and idx.contains(["new-item"]) == [True]


def test_fingerprint_mismatch_is_refused(catalogue: Catalogue, embedder: Embedder,
                                         tmp_path: Path) -> None:
    out = tmp_path / "index"
    CatalogIndex.create(out, embedder.dim, fingerprint="another-model-0123").close()
    served = embedder.fingerprint
    for attempt in (lambda: ingest_catalog(catalogue.path, out, embedder, resume=True),
                    lambda: ingest_catalog(catalogue.path, out, embedder, add=True),
                    lambda: Searcher(out, embedder)):
        with pytest.raises(IndexStoreError) as err:
            attempt()
        assert "another-model-0123" in str(err.value) and served in str(err.value)
    # Refused before anything was written.
    with CatalogIndex.open(out, read_only=True) as idx:
        assert len(idx) == 0


@pytest.mark.slow
def test_an_index_with_photo_vectors_refuses_a_server_that_serves_none(catalogue: Catalogue,
                                                                      exported_repository: Path,
                                                                      start_triton, tmp_path: Path) -> None:
    """A repository exported before the ``item`` ensemble returned photo-side vectors (its
    PHOTO_EMBEDDING output taken out here): an index that keeps them is refused by name and
    left as it was; a new index built through that server keeps one vector per item."""
    repo = tmp_path / "older-repository"
    # Symbolic links: no copy of the weights, and no second hard link to the fixture's
    # model.onnx.data, which onnx.load then refuses to read ("potential hardlink attack").
    shutil.copytree(exported_repository, repo, copy_function=os.symlink)
    config_path = repo / S.ITEM / "config.pbtxt"
    config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    outputs = [o for o in config.output if o.name != S.PHOTO_EMBEDDING]
    del config.output[:]
    config.output.extend(outputs)
    for step in config.ensemble_scheduling.step:
        step.output_map.pop(S.PHOTO_EMBEDDING, None)
    config_path.unlink()  # a new file, not a write through the link into the fixture's
    config_path.write_text(text_format.MessageToString(config))

    with start_triton(repo) as server:
        emb = Embedder(server.url)
        try:
            assert not emb.serves_photo_vectors
            keeps = tmp_path / "keeps"
            CatalogIndex.create(keeps, emb.dim, fingerprint=emb.fingerprint, photo_vectors=True).close()
            with pytest.raises(IndexStoreError, match=f"keeps a photo-side vector per item .*{S.PHOTO_EMBEDDING}"):
                ingest_catalog(catalogue.path, keeps, emb, add=True)
            with CatalogIndex.open(keeps, read_only=True) as idx:
                assert len(idx) == 0 and idx.has_photo_vectors
            with pytest.raises(IndexStoreError, match=f"--photo-views .* returns none .*{S.PHOTO_EMBEDDING}"):
                ingest_catalog(catalogue.path, tmp_path / "views", emb, photo_views=2)
            assert not (tmp_path / "views").exists()
            plain = tmp_path / "plain"
            report = ingest_catalog(catalogue.path, plain, emb)
            assert report.added == N_ITEMS
            with CatalogIndex.open(plain, read_only=True) as idx:
                assert len(idx) == N_ITEMS and not idx.has_photo_vectors
        finally:
            emb.close()
    assert S.PHOTO_EMBEDDING in (exported_repository / S.ITEM / "config.pbtxt").read_text()  # fixture untouched
