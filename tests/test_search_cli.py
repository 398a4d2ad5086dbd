"""`xmsearch index | search | delete` end to end against a real tritonserver.

The CLI runs in-process (xmsearch.cli.main) with its output captured.  The catalogue is
the generated demo one (40 products, 3+ of each category); the fusion is untrained, so
the tests check the contract (k ranked results, filters, JSON, exit codes), not
relevance.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from xmsearch.cli import main
from xmsearch.client.index import CatalogIndex
from xmsearch.demo import generate_demo_catalog
from xmsearch.server import free_port

pytestmark = pytest.mark.triton


@dataclass
class Indexed:
    catalog: Path
    index: Path
    url: str
    rows: dict[str, dict]  # id -> catalogue row
    photo: Path  # a query photo


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def search_json(capsys, ix: Indexed, *args: str) -> list[dict]:
    code, out, err = run(capsys, "search", "--index", ix.index, "--url", ix.url, "--json", *args)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def indexed(xm_server, tmp_path_factory: pytest.TempPathFactory) -> Indexed:
    """The demo catalogue indexed once through `xmsearch index`."""
    root = tmp_path_factory.mktemp("cli")
    generate_demo_catalog(root / "demo", n=40, seed=3, n_queries=3)
    catalog = root / "demo" / "catalog.jsonl"
    code = main(["index", str(catalog), "--out", str(root / "index"), "--url", xm_server.url,
                 "--chunk-size", "16"])
    assert code == 0
    rows = {r["id"]: r for r in map(json.loads, catalog.read_text(encoding="utf-8").splitlines())}
    return Indexed(catalog, root / "index", xm_server.url, rows,
                   root / "demo" / "query_images" / "q00002.jpg")


def test_index_prints_a_summary(xm_server, tmp_path: Path, indexed: Indexed,
                                capsys: pytest.CaptureFixture[str]) -> None:
    # A two-row catalogue (absolute photo paths) through the same command.
    rows = list(indexed.rows.values())[:2]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({**r, "image": str(indexed.catalog.parent / r["image"])}) + "\n"
                             for r in rows) + '{"id": "x", "title": ""}\n', encoding="utf-8")
    code, out, err = run(capsys, "index", small, "--out", tmp_path / "idx", "--url", indexed.url,
                         "--factory", "HNSW32", "--ef-search", "24", "--photo-views", "2", "--alt-titles")
    assert code == 0, err
    assert "skipped line 3 (id x): empty title" in out
    assert f"{tmp_path / 'idx'}: 2 items added, 0 already indexed, 1 bad rows skipped" in out
    with CatalogIndex.open(tmp_path / "idx", read_only=True) as idx:
        assert (idx.factory, idx.search_params, len(idx), idx.photo_views) == ("HNSW32", {"efSearch": 24}, 2, 2)
        assert idx.alt_titles
    err = one_line_error(capsys, "index", small, "--out", tmp_path / "idx", "--url", indexed.url,
                         "--resume", "--no-alt-titles")
    assert "built with the items' other titles in their vectors" in err
    err = one_line_error(capsys, "index", small, "--out", tmp_path / "idx", "--url", indexed.url,
                         "--resume", "--photo-views", "0")
    assert "built with 2 photo views per item, not 0" in err
    err = one_line_error(capsys, "index", small, "--out", tmp_path / "neg", "--url", indexed.url,
                         "--photo-views", "-1")
    assert "photo_views must be an integer from 0 to 16, got -1" in err and not (tmp_path / "neg").exists()
    # The same --out again without --resume/--add: a one-line error, exit 2.
    code, out, err = run(capsys, "index", small, "--out", tmp_path / "idx", "--url", indexed.url)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "--resume" in err


def test_search_prints_k_ranked_results(indexed: Indexed, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "search", "--index", indexed.index, "--url", indexed.url,
                         "--text", "blue down jacket", "-k", "7")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 7
    scores = []
    for rank, line in enumerate(lines, start=1):
        fields = line.split()
        assert fields[0] == f"{rank}."
        scores.append(float(fields[1]))
        assert fields[2] in indexed.rows
        assert indexed.rows[fields[2]]["title"] in line
    assert scores == sorted(scores, reverse=True)


def test_search_json_has_id_score_and_metadata(indexed: Indexed,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    hits = search_json(capsys, indexed, "--text", "红色连衣裙", "-k", "5")
    assert len(hits) == 5
    assert len({h["id"] for h in hits}) == 5
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    for h in hits:
        row = indexed.rows[h["id"]]
        assert h["title"] == row["title"]
        assert h["category"] == row["category"] and h["colour"] == row["colour"]
        assert h["price"] == row["price"]
        assert Path(h["image"]) == indexed.catalog.parent / row["image"]


def test_filter_returns_only_matching_items(indexed: Indexed, capsys: pytest.CaptureFixture[str]) -> None:
    hats = {i for i, r in indexed.rows.items() if r["category"] == "hat"}
    assert len(hats) >= 3
    hits = search_json(capsys, indexed, "--text", "blue down jacket", "-k", "3",
                       "--filter", "category=hat")
    assert len(hits) == 3 and {h["id"] for h in hits} <= hats
    # More asked than exist: every hat, nothing else.
    hits = search_json(capsys, indexed, "--text", "blue down jacket", "-k", "20",
                       "--filter", "category=hat")
    assert {h["id"] for h in hits} == hats
    # Values of one field OR, fields AND.
    bags = {i for i, r in indexed.rows.items() if r["category"] in ("hat", "handbag")}
    hits = search_json(capsys, indexed, "--text", "bag", "-k", "40",
                       "--filter", "category=hat", "--filter", "category=handbag")
    assert {h["id"] for h in hits} == bags
    colour = indexed.rows[next(iter(sorted(hats)))]["colour"]
    want = {i for i in bags if indexed.rows[i]["colour"] == colour}
    hits = search_json(capsys, indexed, "--text", "bag", "-k", "40", "--filter", "category=hat",
                       "--filter", "category=handbag", "--filter", f"colour={colour}")
    assert {h["id"] for h in hits} == want


def test_search_by_photo_and_by_photo_with_text(indexed: Indexed,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    by_photo = search_json(capsys, indexed, "--image", indexed.photo, "-k", "4")
    both = search_json(capsys, indexed, "--image", indexed.photo, "--text", "in red please", "-k", "4")
    text = search_json(capsys, indexed, "--text", "in red please", "-k", "4")
    for hits in (by_photo, both, text):
        assert len(hits) == 4 and all(h["id"] in indexed.rows for h in hits)
    # Three query kinds go through three ensembles: their scores differ.
    assert len({tuple(h["score"] for h in r) for r in (by_photo, both, text)}) == 3


def test_search_draws_a_contact_sheet(indexed: Indexed, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    sheet = tmp_path / "sheets" / "red.png"
    code, out, err = run(capsys, "search", "--index", indexed.index, "--url", indexed.url, "--image",
                         indexed.photo, "--text", "in red please", "-k", "4", "--sheet", sheet)
    assert code == 0, err
    assert f"wrote {sheet}" in out and "1. " in out  # the ranked list is still printed
    with Image.open(sheet) as img:
        assert img.format == "PNG" and img.width > img.height  # the query and four hits on one row


def test_delete_removes_the_item(indexed: Indexed, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Work on a copy: the other tests share the module's index.
    copy = tmp_path / "index"
    shutil.copytree(indexed.index, copy, ignore=shutil.ignore_patterns(".writer.lock"))
    ix = Indexed(indexed.catalog, copy, indexed.url, indexed.rows, indexed.photo)
    query = ("--text", "blue down jacket", "-k", "40")
    before = [h["id"] for h in search_json(capsys, ix, *query)]
    assert len(before) == 40
    victim, other = before[0], before[5]
    code, out, err = run(capsys, "delete", "--index", copy, victim, other)
    assert code == 0, err
    assert f"deleted 2 items from {copy}" in out
    after = [h["id"] for h in search_json(capsys, ix, *query)]
    assert after == [i for i in before if i not in (victim, other)]
    with CatalogIndex.open(copy, read_only=True) as idx:
        assert idx.contains([victim, other, before[1]]) == [False, False, True]

    code, out, err = run(capsys, "delete", "--index", copy, "no-such-id")
    assert code == 2
    assert "no-such-id" in err and err.count("\n") == 1
    code, out, err = run(capsys, "delete", "--index", copy, "no-such-id", before[1], "--missing-ok")
    assert code == 0 and "deleted 1 items" in out


def one_line_error(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_errors_exit_2_with_one_line(indexed: Indexed, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"localhost:{free_port()}"  # nothing listens there
    err = one_line_error(capsys, "search", "--index", indexed.index, "--url", dead, "--text", "cap")
    assert f"server not reachable at {dead}" in err
    err = one_line_error(capsys, "index", indexed.catalog, "--out", tmp_path / "new", "--url", dead)
    assert f"server not reachable at {dead}" in err
    assert not (tmp_path / "new").exists()

    missing = tmp_path / "no-index"
    err = one_line_error(capsys, "search", "--index", missing, "--url", indexed.url, "--text", "cap")
    assert str(missing) in err and "does not exist" in err
    err = one_line_error(capsys, "delete", "--index", missing, "p000001")
    assert str(missing) in err

    photo = tmp_path / "nope.jpg"
    err = one_line_error(capsys, "search", "--index", indexed.index, "--url", indexed.url,
                         "--image", photo)
    assert str(photo) in err

    err = one_line_error(capsys, "search", "--index", indexed.index, "--url", indexed.url)
    assert "text" in err and "image" in err  # a query needs one of them

    err = one_line_error(capsys, "search", "--index", indexed.index, "--url", indexed.url,
                         "--text", "cap", "--filter", "category")
    assert "FIELD=VALUE" in err

    err = one_line_error(capsys, "index", tmp_path / "none.jsonl", "--out", tmp_path / "x",
                         "--url", indexed.url)
    assert "none.jsonl" in err
