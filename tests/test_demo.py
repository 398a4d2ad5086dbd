"""The demo catalogue generator: determinism, schema, relevance grades, image variety."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmsearch.demo import CATEGORIES, COLOURS, PATTERNS, generate_demo_catalog
from xmsearch.errors import InputError

N = 60
N_QUERIES = 30
CJK = re.compile(r"[\u4e00-\u9fff]")

# Words that must appear in a title or query about a category / colour, written here
# independently of the generator's vocabulary (lower-cased substring match).
CATEGORY_WORDS = {
    "down_jacket": ("down", "puffer", "padded coat", "羽绒", "面包服"),
    "t_shirt": ("t-shirt", "tee", "short sleeves", "t恤", "体恤", "短袖"),
    "dress": ("dress", "frock", "连衣裙", "长裙", "裙装"),
    "trousers": ("trousers", "pants", "slacks", "裤"),
    "sneakers": ("sneakers", "trainers", "running shoes", "athletic shoes", "kicks", "鞋"),
    "boots": ("boots", "靴"),
    "handbag": ("handbag", "tote", "shoulder bag", "purse", "top-handle bag", "包"),
    "backpack": ("backpack", "rucksack", "daypack", "knapsack", "包"),
    "hat": ("cap", "hat", "帽"),
    "watch": ("watch", "timepiece", "表"),
    "hoodie": ("hood", "卫衣", "帽衫"),
    "skirt": ("skirt", "裙"),
}
COLOUR_WORDS = {
    "red": ("red", "scarlet", "红"),
    "orange": ("orange", "橙", "橘"),
    "yellow": ("yellow", "黄"),
    "green": ("green", "绿"),
    "blue": ("blue", "蓝"),
    "navy": ("navy", "dark blue", "藏青", "藏蓝", "深蓝"),
    "purple": ("purple", "violet", "紫"),
    "pink": ("pink", "粉"),
    "brown": ("brown", "棕", "咖啡"),
    "black": ("black", "黑"),
    "white": ("white", "白"),
    "grey": ("grey", "gray", "灰"),
}
ROW_FIELDS = {"id", "title", "lang", "image", "alt_titles", "category", "colour", "pattern", "gender", "price",
              "brand"}


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _mentions(text: str, words: tuple[str, ...]) -> bool:
    low = text.lower()
    return any(w in low for w in words)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo_catalog(out, n=N, seed=0, n_queries=N_QUERIES)
    return out, summary


@pytest.fixture(scope="module")
def catalog(demo) -> list[dict]:
    return _read_jsonl(demo[0] / "catalog.jsonl")


@pytest.fixture(scope="module")
def queries(demo) -> list[dict]:
    return _read_jsonl(demo[0] / "queries.jsonl")


@pytest.mark.slow
def test_same_seed_gives_identical_bytes_and_other_seed_differs(demo, tmp_path):
    root, _ = demo
    again = tmp_path / "again"
    generate_demo_catalog(again, n=N, seed=0, n_queries=N_QUERIES)
    first, second = _tree_digest(root), _tree_digest(again)
    assert len(first) == 2 + N + 2 * N_QUERIES // 3  # two JSONL files, item photos, query photos
    assert first == second

    # Another seed, smallest allowed catalogue (cheap): different rows and different photos.
    other = tmp_path / "other"
    generate_demo_catalog(other, n=24, seed=1, n_queries=3)
    third = _tree_digest(other)
    assert _read_jsonl(other / "catalog.jsonl") != _read_jsonl(root / "catalog.jsonl")[:24]
    assert third["queries.jsonl"] != first["queries.jsonl"]
    same_images = [k for k in third if k.endswith(".jpg") and first.get(k) == third[k]]
    assert same_images == []


def test_items_do_not_depend_on_catalogue_size(catalog, demo, tmp_path):
    # Item i is seeded by (seed, i) alone: a smaller catalogue holds the same first items.
    smaller = tmp_path / "smaller"
    generate_demo_catalog(smaller, n=24, seed=0, n_queries=0)
    rows = _read_jsonl(smaller / "catalog.jsonl")
    assert rows == catalog[:24]
    for row in rows:
        assert (smaller / row["image"]).read_bytes() == (demo[0] / row["image"]).read_bytes()
    assert _read_jsonl(smaller / "queries.jsonl") == []


def test_first_query_continues_the_query_stream_of_the_same_catalogue(catalog, queries, demo, tmp_path):
    # Query q is seeded by (seed, q) alone: starting at K draws queries K+1.. of the same
    # catalogue, so a development set is disjoint from the evaluation set by construction.
    more = tmp_path / "more"
    summary = generate_demo_catalog(more, n=N, seed=0, n_queries=6, first_query=N_QUERIES - 3)
    assert summary["first_query"] == N_QUERIES - 3 and summary["n_queries"] == 6
    assert _read_jsonl(more / "catalog.jsonl") == catalog
    drawn = _read_jsonl(more / "queries.jsonl")
    assert drawn[:3] == queries[-3:]
    assert [q["qid"] for q in drawn[3:]] == [f"q{N_QUERIES + i:05d}" for i in (1, 2, 3)]
    assert not {q["qid"] for q in drawn[3:]} & {q["qid"] for q in queries}
    for q in drawn[:3]:
        if "image" in q:
            assert (more / q["image"]).read_bytes() == (demo[0] / q["image"]).read_bytes()


def test_catalogue_rows_schema(catalog, demo):
    root, _ = demo
    assert len(catalog) == N
    assert [r["id"] for r in catalog] == [f"p{i:06d}" for i in range(N)]
    for row in catalog:
        assert set(row) == ROW_FIELDS, row
        assert row["image"] == f"images/{row['id']}.jpg"
        with Image.open(root / row["image"]) as img:
            assert img.format == "JPEG" and img.size == (256, 256) and img.mode == "RGB"
        assert row["category"] in CATEGORIES and row["colour"] in COLOURS and row["pattern"] in PATTERNS
        assert row["gender"] in ("men", "women", "unisex", None)
        assert isinstance(row["price"], float) and row["price"] > 0
        assert isinstance(row["brand"], str) and row["brand"]
        assert row["lang"] in ("en", "zh")
        assert isinstance(row["alt_titles"], list) and len(row["alt_titles"]) == 2
        other, variant = row["alt_titles"]
        # Primary title and the synonym variant are in the row's language, the other title is not.
        assert bool(CJK.search(row["title"])) == (row["lang"] == "zh"), row
        assert bool(CJK.search(variant)) == (row["lang"] == "zh"), row
        assert bool(CJK.search(other)) == (row["lang"] == "en"), row
        for title in [row["title"], *row["alt_titles"]]:
            assert title == title.strip() and "  " not in title
            assert _mentions(title, CATEGORY_WORDS[row["category"]]), (title, row["category"])
            assert _mentions(title, COLOUR_WORDS[row["colour"]]), (title, row["colour"])
    assert sum(r["title"] != r["alt_titles"][1] for r in catalog) >= N * 0.9


def test_catalogue_coverage_and_languages(catalog, demo):
    cats = Counter(r["category"] for r in catalog)
    cols = Counter(r["colour"] for r in catalog)
    assert len(cats) >= 10 and len(cols) >= 10
    assert len({r["pattern"] for r in catalog}) >= 3
    zh = sum(r["lang"] == "zh" for r in catalog)
    assert 0.15 * N <= zh <= 0.55 * N  # "about one third"
    assert any(CJK.search(r["title"]) for r in catalog)
    _, summary = demo
    assert summary["categories"] == dict(cats) and summary["colours"] == dict(cols)
    assert summary["n_items"] == N and summary["n_queries"] == N_QUERIES
    assert Path(summary["catalog"]).is_file() and Path(summary["queries"]).is_file()


def test_no_two_catalogue_images_are_identical(catalog, demo):
    root, _ = demo
    pixels = set()
    for row in catalog:
        with Image.open(root / row["image"]) as img:
            pixels.add(hashlib.sha256(np.asarray(img).tobytes()).hexdigest())
    assert len(pixels) == N


def test_query_schema_and_grades(catalog, queries, demo):
    root, summary = demo
    by_id = {r["id"]: r for r in catalog}
    assert [q["qid"] for q in queries] == [f"q{i:05d}" for i in range(1, N_QUERIES + 1)]
    assert Counter(q["kind"] for q in queries) == Counter(summary["query_kinds"])
    assert set(summary["query_kinds"]) == {"text", "image", "text_image"}
    for q in queries:
        assert q["lang"] in ("en", "zh")
        relevant = q["relevant"]
        assert relevant and set(relevant) <= set(by_id), q["qid"]
        assert set(relevant.values()) <= {1, 2}
        if q["kind"] != "text":
            assert q["image"] == f"query_images/{q['qid']}.jpg"
            with Image.open(root / q["image"]) as img:
                assert img.size == (256, 256)
        else:
            assert "image" not in q
        if q["kind"] == "image":
            assert "text" not in q and list(relevant.values()) == [2]
            continue
        assert q["text"] and bool(CJK.search(q["text"])) == (q["lang"] == "zh"), q
        # Text kinds: grade 2 = every item of one category in one colour, grade 1 = the
        # rest of that category, checked against the catalogue's attributes.
        (category,) = {by_id[i]["category"] for i in relevant}
        targets = {i for i, g in relevant.items() if g == 2}
        (colour,) = {by_id[i]["colour"] for i in targets}
        assert targets == {r["id"] for r in catalog if r["category"] == category and r["colour"] == colour}
        assert set(relevant) == {r["id"] for r in catalog if r["category"] == category}
        assert _mentions(q["text"], COLOUR_WORDS[colour]), q
        if q["kind"] == "text":
            assert _mentions(q["text"], CATEGORY_WORDS[category]), q
        else:
            assert len({by_id[i]["colour"] for i in relevant}) >= 2  # the photo shows another colour


def test_photo_queries_are_new_renderings(queries, demo):
    root, _ = demo
    for q in queries:
        if q["kind"] != "image":
            continue
        (pid,) = q["relevant"]
        with Image.open(root / q["image"]) as a, Image.open(root / "images" / f"{pid}.jpg") as b:
            diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean()
        assert diff > 5.0, (q["qid"], diff)


def test_both_languages_in_queries(queries):
    text_langs = Counter(q["lang"] for q in queries if q["kind"] != "image")
    assert text_langs["en"] > 0 and text_langs["zh"] > 0


@pytest.mark.parametrize("kwargs", [{"n": 5}, {"n": 60, "seed": -1}, {"n": 60, "n_queries": -3},
                                    {"n": 60, "first_query": -1}, {"n": 60, "n_queries": 10, "first_query": 99_990}],
                         ids=["too-few-items", "negative-seed", "negative-queries", "negative-first-query",
                              "past-the-last-query"])
def test_bad_arguments_are_input_errors(tmp_path, kwargs):
    with pytest.raises(InputError):
        generate_demo_catalog(tmp_path, **kwargs)
