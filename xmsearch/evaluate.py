"""Retrieval evaluation through the served ensembles, next to frozen-encoder baselines.

The fused model is measured end to end (query -> Triton ensemble -> FAISS index).  The
baselines answer the same queries in-process with the raw encoders: mean-pooled text
states (query vs titles) and mean-pooled image regions (photo vs photos), each on the
query kinds it can serve (a text+image query gives the text baseline its text and the
image baseline its photo).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from xmsearch.catalog import read_catalog
from xmsearch.errors import InputError
from xmsearch.metrics import evaluate, query_scores

KINDS = ("text", "image", "text_image")
# (column title, key in xmsearch.metrics.evaluate's result) of the printed table.
TABLE_COLUMNS = (("Recall@1", "recall@1"), ("Recall@5", "recall@5"), ("Recall@10", "recall@10"),
                 ("MRR", "mrr"), ("nDCG@10", "ndcg@10"))


def load_queries(path: Path) -> list[dict]:
    """Read queries.jsonl; image paths become absolute (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"query file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(q, dict):
            raise InputError(f"{path} line {n}: not a JSON object")
        if not q.get("relevant"):
            raise InputError(f"{path} line {n}: query has no 'relevant' map")
        if q.get("image"):
            q["image"] = str((path.parent / q["image"]).resolve()) if not Path(q["image"]).is_absolute() \
                else q["image"]
        q.setdefault("kind", "text_image" if q.get("text") and q.get("image")
                     else "image" if q.get("image") else "text")
        # run_served batches by kind: a query of another kind, or lacking the text or
        # photo its kind needs, would otherwise vanish from the run or fail mid-way.
        if q["kind"] not in KINDS:
            raise InputError(f"{path} line {n}: kind {q['kind']!r} is not one of {', '.join(KINDS)}")
        for field in ("text", "image"):
            if field in q["kind"] and not q.get(field):
                raise InputError(f"{path} line {n}: a {q['kind']} query needs a non-empty {field!r}")
        q.setdefault("qid", f"line{n}")
        out.append(q)
    return out


def run_served(searcher, queries: list[dict], k: int = 10, batch: int = 32,
               progress: Callable[[int, int], None] | None = None) -> dict[str, list[str]]:
    """Ranked ids per query from the served model (queries batched per kind)."""
    return ranked_ids(served_hits(searcher, queries, k, batch, progress))


def ranked_ids(hits: Mapping[str, Sequence]) -> dict[str, list[str]]:
    """{qid: ranked ids} of :func:`served_hits`' {qid: ranked hits}."""
    return {qid: [h.id for h in hs] for qid, hs in hits.items()}


def served_hits(searcher, queries: list[dict], k: int = 10, batch: int = 32,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Ranked hits (:class:`xmsearch.client.index.Hit`: id, score, metadata) per query from the
    served model, queries batched per kind."""
    results: dict = {}
    done = 0
    for kind in KINDS:
        qs = [q for q in queries if q["kind"] == kind]
        for i in range(0, len(qs), batch):
            chunk = qs[i:i + batch]
            texts = [q["text"] for q in chunk] if kind != "image" else None
            images = [q["image"] for q in chunk] if kind != "text" else None
            for q, hits in zip(chunk, searcher.search_many(texts, images, k)):
                results[q["qid"]] = hits
            done += len(chunk)
            if progress:
                progress(done, len(queries))
    return results


def _topk(q: torch.Tensor, z: torch.Tensor, ids: list[str], k: int) -> list[list[str]]:
    idx = (q @ z.T).topk(min(k, len(ids)), dim=1).indices
    return [[ids[j] for j in row] for row in idx.tolist()]


@torch.no_grad()
def run_baselines(catalog: Path, queries: list[dict], text_model: str, image_model: str,
                  k: int = 10, batch: int = 64, features=None) -> dict[str, dict[str, list[str]]]:
    """Rankings of the raw-encoder baselines: {"text_encoder": {...}, "image_encoder": {...}}.

    ``features``: the training feature cache of this catalogue and these encoders
    (:class:`xmsearch.train.Features`), if at hand: its passage-role title states and
    catalogue-photo regions are the baselines' catalogue side, so it is not encoded twice.
    """
    from xmsearch.models.text import mean_pool
    from xmsearch.pipeline import Encoders

    enc = Encoders.load(text_model, image_model)
    rows, _ = read_catalog(Path(catalog))
    ids = [r.id for r in rows]
    if features is not None and list(features.ids) != ids:
        raise InputError("run_baselines: the cached features are of another catalogue (ids differ)")

    # The baselines' pooling: mean over tokens (text) and over regions (image).
    def text_vec(states, mask):
        return F.normalize(mean_pool(states.float(), mask), dim=-1)

    def image_vec(regions):
        return F.normalize(regions.float().mean(1), dim=-1)

    def text_vecs(texts, role):
        return torch.cat([text_vec(*enc.text_states(texts[i:i + batch], role))
                          for i in range(0, len(texts), batch)])

    def image_vecs(paths):
        return torch.cat([image_vec(enc.image_regions([Path(p).read_bytes() for p in paths[i:i + batch]]))
                          for i in range(0, len(paths), batch)])

    if features is not None:
        titles = text_vec(features.item_states, features.item_mask)
        photos = image_vec(features.regions[:, 0])
    else:
        titles = text_vecs([r.title for r in rows], "passage")
        photos = image_vecs([r.image for r in rows])
    text_q = [q for q in queries if q.get("text")]
    image_q = [q for q in queries if q.get("image")]
    res = {"text_encoder": {}, "image_encoder": {}}
    if text_q:
        for q, r in zip(text_q, _topk(text_vecs([q["text"] for q in text_q], "query"), titles, ids, k)):
            res["text_encoder"][q["qid"]] = r
    if image_q:
        for q, r in zip(image_q, _topk(image_vecs([q["image"] for q in image_q]), photos, ids, k)):
            res["image_encoder"][q["qid"]] = r
    return res


QUERY_FIELDS = ("qid", "kind", "lang", "text", "image")  # copied from the query file into per-query rows
NOT_ATTRIBUTES = ("title", "image")  # metadata fields that name no attribute of a product


def shared_attributes(items: Sequence[Mapping]) -> dict[str, str]:
    """The text attributes all of ``items`` (metadata dicts) have, with the one value they
    share: for a query's top-grade items, what the query asks for (a kind and a colour, or
    every attribute of the one photographed product)."""
    if not items:
        return {}
    return {f: v for f, v in items[0].items() if f not in NOT_ATTRIBUTES and isinstance(v, str)
            and all(other.get(f) == v for other in items[1:])}


def per_query_rows(results: Mapping[str, Sequence], queries: list[dict], ndcg_k: int = 10,
                   metadata: Mapping[str, Mapping] | None = None) -> list[dict]:
    """One row per query, the worst nDCG first (ties in file order): its own fields
    (``QUERY_FIELDS``), its metrics (those of :func:`xmsearch.metrics.evaluate`), the top grade
    among its relevant items, and its ranked results as ``{"id", "grade"}``, with ``score``
    and ``title`` where ``results`` holds hits (:func:`served_hits`) rather than plain ids.

    With ``metadata`` (id -> metadata dict, for the queries' top-grade items at least; a hit's
    own metadata is used where it has some), the row also holds ``asked``, the attributes its
    top-grade items share (:func:`shared_attributes`), and every result below the top grade
    ``off``, the asked attributes it does not have: what a miss got wrong.

    What ``xmsearch eval --per-query`` writes: the misses behind a mean, readable without
    the query file or the catalogue."""
    rows = []
    for q in queries:
        if q["qid"] not in results:
            raise InputError(f"per-query results: no results for query {q['qid']!r}; search every "
                             "query of the file (or pass only the queries that were run)")
        ranked = list(results[q["qid"]])
        relevant = q["relevant"]
        top_grade = max(relevant.values(), default=0)
        ids = [h if isinstance(h, str) else h.id for h in ranked]
        try:
            scores = query_scores(ids, relevant, ndcg_k=ndcg_k)
        except InputError as exc:
            raise InputError(f"per-query results: query {q['qid']!r}: {exc}") from exc
        row = {**{f: q[f] for f in QUERY_FIELDS if f in q}, **scores, "relevant_top_grade": top_grade,
               "relevant_top_count": sum(g == top_grade for g in relevant.values())}
        asked = None
        if metadata is not None:
            asked = shared_attributes([metadata[i] for i, g in relevant.items() if g == top_grade and i in metadata])
            row["asked"] = asked
        hits = []
        for h, item in zip(ranked, ids):
            hit = {"id": item, "grade": int(relevant.get(item, 0))}
            meta = metadata.get(item) if metadata is not None else None
            if not isinstance(h, str):
                hit["score"] = float(h.score)
                meta = h.metadata or meta
                if "title" in h.metadata:
                    hit["title"] = h.metadata["title"]
            if asked is not None and meta is not None and hit["grade"] < top_grade:
                hit["off"] = sorted(f for f, v in asked.items() if meta.get(f) != v)
            hits.append(hit)
        rows.append({**row, "results": hits})
    return sorted(rows, key=lambda r: r[f"ndcg@{ndcg_k}"])


def miss_table(rows: list[dict], k: int = 10) -> dict[str, dict[str, float]]:
    """Per query kind (and ``all``), over the result slots a query could fill with top-grade
    items (its first min(k, their count), as Recall@k counts them) of :func:`per_query_rows`
    made with ``metadata``: ``slots``, the share holding a top-grade item (``right``), and per
    asked attribute the share holding an item with another value of it, largest first (a
    slot wrong in two attributes counts for both)."""
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        for kind in (r["kind"], "all"):
            c = counts.setdefault(kind, {"slots": 0, "right": 0})
            for hit in r["results"][: min(k, r["relevant_top_count"])]:
                c["slots"] += 1
                if hit["grade"] >= r["relevant_top_grade"]:
                    c["right"] += 1
                for attribute in hit.get("off", ()):
                    c[attribute] = c.get(attribute, 0) + 1
    table = {}
    for kind in sorted(name for name in counts if name != "all") + (["all"] if counts else []):
        c = counts[kind]
        n = max(c["slots"], 1)
        wrong = sorted(((a, v / n) for a, v in c.items() if a not in ("slots", "right")), key=lambda av: -av[1])
        table[kind] = {"slots": c["slots"], "right": c["right"] / n, **dict(wrong)}
    return table


def format_miss_table(table: dict[str, dict[str, float]], most: int = 4) -> str:
    """One line per query kind: its slots, the share right, and the ``most`` attributes the
    others got wrong most often."""
    lines = ["result slots a top-grade item could fill, and the attributes (shared by the query's "
             "top-grade items) the others got wrong:"]
    for kind, vals in table.items():
        wrong = [(a, v) for a, v in vals.items() if a not in ("slots", "right")][:most]
        lines.append(f"  {kind:11s} {int(vals['slots']):5d} slots: right {vals['right']:.1%}"
                     + ("; wrong " + ", ".join(f"{a} {v:.1%}" for a, v in wrong) if wrong else ""))
    return "\n".join(lines)


def top_grade_metadata(index, queries: list[dict]) -> dict[str, dict]:
    """id -> metadata, from ``index`` (a CatalogIndex or MilvusIndex), of the queries' top-grade
    items that it holds."""
    wanted = sorted({i for q in queries for i, g in q["relevant"].items()
                     if g == max(q["relevant"].values())})
    held = [i for i, ok in zip(wanted, index.contains(wanted)) if ok] if wanted else []
    return dict(zip(held, index.get(held))) if held else {}


def write_per_query(rows: list[dict], path: Path) -> Path:
    """The rows of :func:`per_query_rows` as JSON lines (UTF-8, written whole or not at all)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def evaluation_table(served: dict[str, list[str]], queries: list[dict],
                     baselines: dict[str, dict[str, list[str]]] | None = None) -> dict:
    """{system: {kind: {metric: value}}} for the served model and each baseline."""
    table = {"fused (served)": evaluate(served, queries)}
    for name, ranking in (baselines or {}).items():
        qs = [q for q in queries if q["qid"] in ranking]
        table[f"baseline: raw {name.replace('_', ' ')}"] = evaluate(ranking, qs)
    return table


def language_table(served: dict[str, list[str]], queries: list[dict],
                   system: str = "fused (served), by language") -> dict:
    """{system: {"KIND / LANG": metrics}} for the queries with words, split by their ``lang``
    field; empty when they are all in one language (or carry none).

    A bilingual catalogue's figures can hide one language failing: the offline default text
    encoder reads no Chinese, and a held-out word hurts one language more than another."""
    worded = [q for q in queries if q.get("text") and q.get("lang")]
    if len({q["lang"] for q in worded}) < 2:
        return {}
    rows = evaluate(served, worded, group=lambda q: f"{q['kind']} / {q['lang']}")
    del rows["all"]  # every worded query pooled: neither one kind nor one language
    return {system: rows}


def report(served: dict[str, list[str]], queries: list[dict],
           baselines: dict[str, dict[str, list[str]]] | None = None, out: Callable[[str], None] = print) -> dict:
    """Print the evaluation table, then the per-language one when the worded queries span
    languages; return both in one dict (what ``xmsearch eval --json`` and ``make demo`` write)."""
    table = evaluation_table(served, queries, baselines)
    out(format_table(table))
    by_language = language_table(served, queries)
    if by_language:
        out(format_table(by_language))
        table.update(by_language)
    return table


def format_table(table: dict) -> str:
    """A plain-text table: one row per (system, kind)."""
    lines = [f"{'system':34s} {'kind':15s} {'n':>4s} "
             + " ".join(f"{title:>9s}" for title, _ in TABLE_COLUMNS)]
    for system, kinds in table.items():
        for kind, vals in kinds.items():
            lines.append(f"{system:34s} {kind:15s} {int(vals.get('count', 0)):4d} "
                         + " ".join(f"{vals.get(key, float('nan')):9.3f}" for _, key in TABLE_COLUMNS))
    return "\n".join(lines)
