"""xmsearch.evaluate: query loading, the metrics table, and a served run.

The table tests use hand-made rankings whose metrics are worked out below from the
definitions in xmsearch/metrics.py: the target set R holds the ids of a query's highest
grade; Recall@k = |top-k & R| / min(|R|, k); RR = 1 / rank of the first id of R;
nDCG@k = DCG / IDCG with gain 2^g - 1 and discount log2(rank + 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from xmsearch import evaluate as ev
from xmsearch.errors import InputError

# --------------------------------------------------------------------------- load_queries


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)
                              for x in lines) + "\n", encoding="utf-8")
    return path


def test_load_queries_resolves_images_and_fills_kind_and_qid(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path_factory.mktemp("photos") / "abs.jpg"
    path = write_lines(tmp_path / "queries.jsonl", [
        {"qid": "t1", "kind": "text", "text": "red cap", "relevant": {"a": 2}},
        "",  # blank lines are skipped but still counted
        {"text": "like this in blue", "image": "query_images/q.jpg", "relevant": {"b": 2, "c": 1}},
        {"image": str(elsewhere), "relevant": {"c": 2}},
        {"text": "蓝色羽绒服", "relevant": {"d": 1}},
    ])
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # paths follow the file, not the cwd
    qs = ev.load_queries(path)
    assert [q["qid"] for q in qs] == ["t1", "line3", "line4", "line5"]
    assert [q["kind"] for q in qs] == ["text", "text_image", "image", "text"]
    assert qs[1]["image"] == str((tmp_path / "query_images" / "q.jpg").resolve())
    assert Path(qs[1]["image"]).is_absolute()
    assert qs[2]["image"] == str(elsewhere)
    assert qs[1]["relevant"] == {"b": 2, "c": 1}
    assert qs[3]["text"] == "蓝色羽绒服"


@pytest.mark.parametrize("line, message", [
    ('{"qid": "x", "text": "cap",', "line 2: not valid JSON"),
    ({"qid": "x", "text": "cap"}, "line 2: query has no 'relevant' map"),
    ({"qid": "x", "text": "cap", "relevant": {}}, "line 2: query has no 'relevant' map"),
    ('["not", "an", "object"]', "line 2: not a JSON object"),
    ({"qid": "x", "kind": "video", "text": "cap", "relevant": {"a": 1}}, "kind 'video'"),
    ({"qid": "x", "kind": "image", "text": "cap", "relevant": {"a": 1}}, "needs a non-empty 'image'"),
    ({"qid": "x", "kind": "text_image", "image": "q.jpg", "relevant": {"a": 1}},
     "needs a non-empty 'text'"),
])
def test_load_queries_refuses_bad_lines_naming_them(tmp_path: Path, line: object, message: str) -> None:
    path = write_lines(tmp_path / "queries.jsonl",
                       [{"qid": "ok", "text": "cap", "relevant": {"a": 2}}, line])
    with pytest.raises(InputError) as err:
        ev.load_queries(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_load_queries_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        ev.load_queries(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- the table

QUERIES = [
    {"qid": "q1", "kind": "text", "text": "red cap", "relevant": {"a": 2, "b": 1, "c": 1}},
    {"qid": "q2", "kind": "image", "image": "/x/q2.jpg", "relevant": {"d": 2}},
    {"qid": "q3", "kind": "text_image", "text": "in red", "image": "/x/q3.jpg",
     "relevant": {"e": 2, "f": 2, "g": 1}},
    {"qid": "q4", "kind": "text", "text": "blue bag", "relevant": {"a": 2}},
]
SERVED = {
    "q1": ["b", "a", "x", "c"],
    "q2": ["x", "y", "z", "w", "v", "d"],
    "q3": ["e", "g", "f"],
    "q4": [],
}

# q1: R = {a}, a at rank 2.  R@1 = 0/1, R@5 = R@10 = 1/1, RR = 1/2.
#     ranked grades b=1, a=2, x=0, c=1:  DCG = 1/log2(2) + 3/log2(3) + 0 + 1/log2(5)
#     ideal grades 2, 1, 1:              IDCG = 3/log2(2) + 1/log2(3) + 1/log2(4)
Q1_NDCG = (1 + 3 / math.log2(3) + 1 / math.log2(5)) / (3 + 1 / math.log2(3) + 1 / 2)  # 0.80453
# q2: R = {d}, d at rank 6.  R@1 = R@5 = 0, R@10 = 1, RR = 1/6, nDCG = (3/log2(7)) / 3.
Q2_NDCG = 1 / math.log2(7)  # 0.35621
# q3: R = {e, f} at ranks 1 and 3.  R@1 = 1/min(2,1) = 1, R@5 = R@10 = 2/2 = 1, RR = 1.
#     DCG = 3/1 + 1/log2(3) + 3/log2(4); IDCG (grades 2, 2, 1) = 3/1 + 3/log2(3) + 1/log2(4)
Q3_NDCG = (3 + 1 / math.log2(3) + 1.5) / (3 + 3 / math.log2(3) + 0.5)  # 0.95144
# q4: nothing ranked: every metric is 0.
EXPECTED_SERVED = {
    "image": {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 1.0, "mrr": 1 / 6,
              "ndcg@10": Q2_NDCG, "count": 1},
    "text": {"recall@1": 0.0, "recall@5": 0.5, "recall@10": 0.5, "mrr": 0.25,
             "ndcg@10": Q1_NDCG / 2, "count": 2},
    "text_image": {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 1.0,
                   "ndcg@10": Q3_NDCG, "count": 1},
    "all": {"recall@1": 1 / 4, "recall@5": 2 / 4, "recall@10": 3 / 4,
            "mrr": (1 / 2 + 1 / 6 + 1) / 4, "ndcg@10": (Q1_NDCG + Q2_NDCG + Q3_NDCG) / 4,
            "count": 4},
}
# A baseline that answered only the photo query, finding d first: perfect on it.
BASELINES = {"image_encoder": {"q2": ["d", "x"]}}


def approx_table(expected: dict) -> dict:
    return {kind: {m: pytest.approx(v, abs=1e-9) for m, v in vals.items()}
            for kind, vals in expected.items()}


def test_evaluation_table_matches_hand_computed_values() -> None:
    table = ev.evaluation_table(SERVED, QUERIES, BASELINES)
    assert list(table) == ["fused (served)", "baseline: raw image encoder"]
    assert table["fused (served)"] == approx_table(EXPECTED_SERVED)
    perfect = {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 1.0, "ndcg@10": 1.0,
               "count": 1}
    # Only the queries a baseline answered are scored for it.
    assert table["baseline: raw image encoder"] == approx_table({"image": perfect, "all": perfect})


def test_per_query_rows_carry_each_querys_metrics_and_graded_results_worst_first() -> None:
    rows = ev.per_query_rows(SERVED, QUERIES)
    # Worst nDCG@10 first (q4: nothing ranked), then q2, q1, q3.
    assert [r["qid"] for r in rows] == ["q4", "q2", "q1", "q3"]
    by_qid = {r["qid"]: r for r in rows}
    assert by_qid["q1"]["ndcg@10"] == pytest.approx(Q1_NDCG) and by_qid["q1"]["mrr"] == 0.5
    assert by_qid["q1"]["recall@1"] == 0.0 and by_qid["q1"]["recall@10"] == 1.0
    assert by_qid["q2"]["mrr"] == pytest.approx(1 / 6) and by_qid["q2"]["recall@5"] == 0.0
    assert by_qid["q4"]["results"] == [] and by_qid["q4"]["ndcg@10"] == 0.0
    assert by_qid["q1"]["results"] == [{"id": "b", "grade": 1}, {"id": "a", "grade": 2},
                                       {"id": "x", "grade": 0}, {"id": "c", "grade": 1}]
    # The query's own fields come along, so a miss can be read without the query file.
    assert by_qid["q3"]["text"] == "in red" and by_qid["q3"]["image"] == "/x/q3.jpg"
    assert "image" not in by_qid["q1"] and "relevant" not in by_qid["q1"]
    assert by_qid["q3"]["relevant_top_grade"] == 2


METADATA = {
    "a": {"title": "red cap", "category": "cap", "colour": "red", "price": 9.5},
    "b": {"title": "blue cap", "category": "cap", "colour": "blue"},
    "c": {"title": "green cap", "category": "cap", "colour": "green"},
    "d": {"title": "black bag", "category": "bag", "colour": "black", "brand": "X"},
    "e": {"title": "red shoe", "category": "shoe", "colour": "red"},
    "f": {"title": "red shoe", "category": "shoe", "colour": "red", "brand": "Y"},
    "g": {"title": "blue shoe", "category": "shoe", "colour": "blue"},
    "x": {"title": "red bag", "category": "bag", "colour": "red"},
}


def test_misses_name_the_asked_attributes_they_got_wrong() -> None:
    # What a query asks for is what its top-grade items share (titles and numbers aside): q1
    # a red cap, q2 the black bag of brand X, q3 a red shoe (one of its two has a brand, so
    # brand is not asked).  Only the slots a top-grade item could fill count: min(10, |R|).
    rows = {r["qid"]: r for r in ev.per_query_rows(SERVED, QUERIES, metadata=METADATA)}
    assert rows["q1"]["asked"] == {"category": "cap", "colour": "red"}
    assert rows["q2"]["asked"] == {"category": "bag", "colour": "black", "brand": "X"}
    assert rows["q3"]["asked"] == {"category": "shoe", "colour": "red"}
    assert [h.get("off") for h in rows["q1"]["results"]] == [["colour"], None, ["category"], ["colour"]]
    assert rows["q2"]["results"][0]["off"] == ["brand", "colour"]  # x: a red bag without a brand
    assert "off" not in rows["q2"]["results"][1]  # y: no metadata
    assert rows["q3"]["results"][1]["off"] == ["colour"] and rows["q3"]["relevant_top_count"] == 2
    table = ev.miss_table(list(rows.values()))
    # text: q1's one slot (b, a blue cap), q4 none; image: q2's one slot (x); text_image: q3's
    # two (e right, g a blue shoe).
    assert table == {
        "image": {"slots": 1, "right": 0.0, "brand": 1.0, "colour": 1.0},
        "text": {"slots": 1, "right": 0.0, "colour": 1.0},
        "text_image": {"slots": 2, "right": 0.5, "colour": 0.5},
        "all": {"slots": 4, "right": 0.25, "colour": 0.75, "brand": 0.25},
    }
    assert list(table["all"])[2:] == ["colour", "brand"]  # largest first
    text = ev.format_miss_table(table)
    assert "text_image      2 slots: right 50.0%; wrong colour 50.0%" in text
    assert "all             4 slots: right 25.0%; wrong colour 75.0%, brand 25.0%" in text


def test_per_query_rows_take_scores_and_titles_from_hits() -> None:
    from xmsearch.client.index import Hit

    hits = {q["qid"]: [Hit(i, 0.9 - 0.1 * n, n, {"title": f"title of {i}", "brand": "x"})
                       for n, i in enumerate(SERVED[q["qid"]])] for q in QUERIES}
    rows = {r["qid"]: r for r in ev.per_query_rows(hits, QUERIES)}
    assert rows["q1"]["results"][1] == {"id": "a", "grade": 2, "score": pytest.approx(0.8), "title": "title of a"}
    assert rows["q1"]["ndcg@10"] == pytest.approx(Q1_NDCG)
    with pytest.raises(InputError, match="q4"):
        ev.per_query_rows({k: v for k, v in SERVED.items() if k != "q4"}, QUERIES)


def test_evaluation_table_refuses_a_query_without_results() -> None:
    with pytest.raises(InputError, match="q4"):
        ev.evaluation_table({k: v for k, v in SERVED.items() if k != "q4"}, QUERIES)


def test_format_table_prints_every_system_kind_and_metric() -> None:
    text = ev.format_table(ev.evaluation_table(SERVED, QUERIES, BASELINES))
    lines = text.splitlines()
    assert lines[0].split() == ["system", "kind", "n", "Recall@1", "Recall@5", "Recall@10",
                                "MRR", "nDCG@10"]
    assert len(lines) == 1 + 4 + 2  # header, 4 served rows, 2 baseline rows
    rows = {}
    for line in lines[1:]:
        system, rest = line[:34].strip(), line[34:].split()
        rows[(system, rest[0])] = rest[1:]
    # Three decimals: q1/q4 text row is 0, 1/2, 1/2, 1/4 and 0.80453 / 2 = 0.40227.
    assert rows[("fused (served)", "text")] == ["2", "0.000", "0.500", "0.500", "0.250", "0.402"]
    assert rows[("fused (served)", "image")] == ["1", "0.000", "0.000", "1.000", "0.167", "0.356"]
    assert rows[("fused (served)", "text_image")] == ["1", "1.000", "1.000", "1.000", "1.000",
                                                      "0.951"]
    # all: (0.80453 + 0.35621 + 0.95144) / 4 = 0.52805; MRR (1/2 + 1/6 + 1) / 4 = 0.41667.
    assert rows[("fused (served)", "all")] == ["4", "0.250", "0.500", "0.750", "0.417", "0.528"]
    assert rows[("baseline: raw image encoder", "image")] == ["1"] + ["1.000"] * 5
    assert "nan" not in text


def test_language_table_splits_worded_queries_by_language() -> None:
    langs = {"q1": "en", "q2": "en", "q3": "en", "q4": "zh"}
    queries = [{**q, "lang": langs[q["qid"]]} for q in QUERIES]
    table = ev.language_table(SERVED, queries)["fused (served), by language"]
    # Photo-only queries have no words to be in a language: no "image / en" row.
    assert list(table) == ["text / en", "text / zh", "text_image / en"]
    # q1 alone (worked out above) and q4 alone (no results: every metric 0).
    assert table["text / en"] == pytest.approx({"recall@1": 0.0, "recall@5": 1.0, "recall@10": 1.0,
                                                "mrr": 0.5, "ndcg@10": Q1_NDCG, "count": 1})
    assert table["text / zh"] == pytest.approx({"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0,
                                                "mrr": 0.0, "ndcg@10": 0.0, "count": 1})
    # The two languages' rows average back to the kind's own row.
    whole = ev.evaluate(SERVED, queries)["text"]
    for metric in ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"):
        assert (table["text / en"][metric] + table["text / zh"][metric]) / 2 == pytest.approx(whole[metric])
    text = ev.format_table({"fused (served), by language": table})
    assert [line[34:].split()[:3] for line in text.splitlines()[1:]] == [
        ["text", "/", "en"], ["text", "/", "zh"], ["text_image", "/", "en"]]
    # One language (or none given): nothing to split.
    assert ev.language_table(SERVED, [{**q, "lang": "en"} for q in QUERIES]) == {}
    assert ev.language_table(SERVED, QUERIES) == {}


def test_report_prints_the_language_table_only_for_several_languages() -> None:
    printed: list[str] = []
    one = ev.report(SERVED, QUERIES, BASELINES, out=printed.append)
    assert one == ev.evaluation_table(SERVED, QUERIES, BASELINES)
    assert printed == [ev.format_table(one)]
    printed.clear()
    langs = {"q1": "en", "q2": "en", "q3": "en", "q4": "zh"}
    queries = [{**q, "lang": langs[q["qid"]]} for q in QUERIES]
    both = ev.report(SERVED, queries, BASELINES, out=printed.append)
    by_language = ev.language_table(SERVED, queries)
    assert both == {**ev.evaluation_table(SERVED, queries, BASELINES), **by_language}
    assert printed == [ev.format_table(ev.evaluation_table(SERVED, queries, BASELINES)),
                       ev.format_table(by_language)]


# --------------------------------------------------------------------------- served


@pytest.mark.triton
@pytest.mark.slow
def test_run_served_ranks_every_query(xm_server, tmp_path_factory: pytest.TempPathFactory,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from xmsearch.cli import main
    from xmsearch.client.embed import Embedder
    from xmsearch.client.ingest import ingest_catalog
    from xmsearch.client.search import Searcher
    from xmsearch.demo import MIN_ITEMS, generate_demo_catalog

    root = tmp_path_factory.mktemp("eval")
    generate_demo_catalog(root / "demo", n=MIN_ITEMS, seed=1, n_queries=9)
    catalog_ids = {json.loads(x)["id"] for x in (root / "demo" / "catalog.jsonl").read_text().splitlines()}
    queries = ev.load_queries(root / "demo" / "queries.jsonl")
    assert sorted({q["kind"] for q in queries}) == ["image", "text", "text_image"]

    emb = Embedder(xm_server.url, timeout_s=120.0)
    try:
        ingest_catalog(root / "demo" / "catalog.jsonl", root / "index", emb)
        searcher = Searcher(root / "index", emb)
        try:
            seen = []
            served = ev.run_served(searcher, queries, k=10, batch=2,
                                   progress=lambda done, total: seen.append((done, total)))
        finally:
            searcher.close()
    finally:
        emb.close()
    assert sorted(served) == sorted(q["qid"] for q in queries)
    for qid, ranking in served.items():
        assert len(ranking) == 10 and len(set(ranking)) == 10, qid
        assert set(ranking) <= catalog_ids
    assert seen[-1] == (len(queries), len(queries))
    # The fusion is untrained: the values mean nothing, but each kind is scored.
    table = ev.evaluation_table(served, queries)["fused (served)"]
    assert {k: v["count"] for k, v in table.items()} == {"image": 3, "text": 3, "text_image": 3,
                                                         "all": 9}
    assert all(0.0 <= v <= 1.0 for vals in table.values() for m, v in vals.items() if m != "count")

    # The same run through the command line, with the table also written as JSON.
    out = root / "metrics.json"
    assert main(["eval", "--index", str(root / "index"), "--queries",
                 str(root / "demo" / "queries.jsonl"), "--url", xm_server.url,
                 "--json", str(out), "--plot", str(root / "metrics.png"),
                 "--per-query", str(root / "per-query.jsonl")]) == 0
    printed = capsys.readouterr().out
    per_query = [json.loads(x) for x in (root / "per-query.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["qid"] for r in per_query) == sorted(q["qid"] for q in queries)
    assert [r["ndcg@10"] for r in per_query] == sorted(r["ndcg@10"] for r in per_query)
    relevant = {q["qid"]: q["relevant"] for q in queries}
    titles = {json.loads(x)["id"]: json.loads(x)["title"]
              for x in (root / "demo" / "catalog.jsonl").read_text(encoding="utf-8").splitlines()}
    for r in per_query:
        assert len(r["results"]) == 10
        for hit in r["results"]:
            assert hit["grade"] == relevant[r["qid"]].get(hit["id"], 0) and hit["title"] == titles[hit["id"]]
            assert -1.0 <= hit["score"] <= 1.0
        assert [h["score"] for h in r["results"]] == sorted((h["score"] for h in r["results"]), reverse=True)
    assert f"wrote {root / 'per-query.jsonl'}" in printed
    # The demo's text queries ask for a kind in a colour; each miss names what it got wrong.
    catalog = {json.loads(x)["id"]: json.loads(x)
               for x in (root / "demo" / "catalog.jsonl").read_text(encoding="utf-8").splitlines()}
    for r in per_query:
        if r["kind"] == "text":
            assert {"category", "colour"} <= set(r["asked"])
        for hit in r["results"]:
            if hit["grade"] < r["relevant_top_grade"]:
                assert hit["off"] == sorted(f for f, v in r["asked"].items() if catalog[hit["id"]].get(f) != v)
    assert "result slots a top-grade item could fill" in printed and "text_image" in printed
    mean = sum(r["recall@10"] for r in per_query) / len(per_query)
    assert mean == pytest.approx(json.loads(out.read_text())["fused (served)"]["all"]["recall@10"])
    assert f"wrote {root / 'metrics.png'}" in printed
    assert (root / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Recall@10" in printed and "fused (served)" in printed and "nan" not in printed
    written = json.loads(out.read_text())
    assert written["fused (served)"] == {kind: pytest.approx(vals) for kind, vals in table.items()}
    # The demo's worded queries are in English and Chinese: their rows by language follow.
    assert {q["lang"] for q in queries if q.get("text")} == {"en", "zh"}
    by_language = written["fused (served), by language"]
    assert sum(v["count"] for v in by_language.values()) == 6
    assert "text / zh" in printed or "text_image / zh" in printed


def test_outputs_that_cannot_be_written_are_refused_before_any_query(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # No index and no server here: the refusal comes before either is opened, so a long
    # evaluation is not run for nothing.
    from xmsearch.cli import main

    queries = write_lines(tmp_path / "queries.jsonl", [QUERIES[0]])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    base = ["eval", "--index", str(tmp_path / "no-index"), "--queries", str(queries)]
    assert main(base + ["--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder; give a file name" in capsys.readouterr().err
    assert main(base + ["--per-query", str(blocker / "sub" / "rows.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"--per-query {blocker / 'sub' / 'rows.jsonl'}: cannot make its folder" in err
    assert main(["search", "--index", str(tmp_path / "no-index"), "--text", "red cap",
                 "--sheet", str(tmp_path)]) == 2
    assert f"--sheet {tmp_path} is a folder" in capsys.readouterr().err
    # A file in a folder that does not exist yet is fine: the folder is made (the run then
    # fails on the missing index, by name).
    assert main(base + ["--plot", str(tmp_path / "new" / "chart.png")]) == 2
    assert (tmp_path / "new").is_dir() and "no-index" in capsys.readouterr().err
