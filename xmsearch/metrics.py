"""Retrieval metrics over graded relevance.

A query's ``relevant`` map gives each relevant product id a positive integer grade
(absent ids have grade 0).  For a ranked list of product ids (best first, rank 1 is the
first):

- **Target set** ``R``: the ids that carry the query's highest grade.  For a text query
  that is "the asked colour and category", for a photo query "the photographed product".
- **Recall@k** = ``|top-k ∩ R| / min(|R|, k)``.  Dividing by ``min(|R|, k)`` instead of
  ``|R|`` makes a perfect ranking score 1 even when ``R`` is larger than ``k``.
- **Reciprocal rank** = ``1 / rank`` of the first id of ``R`` in the list, 0 when no id of
  ``R`` appears.  **MRR** is its mean over queries.
- **nDCG@k** = ``DCG@k / IDCG@k`` with ``DCG@k = sum_{i=1..k} (2^g_i - 1) / log2(i + 1)``
  where ``g_i`` is the grade of the id at rank ``i``, and ``IDCG@k`` the same sum over the
  grades of the ``relevant`` map sorted from high to low (the best possible ranking).

An id repeated in a ranked list counts once, at its first rank, and its later copies
count as non-relevant: a duplicate can neither raise recall nor push nDCG above 1.

:func:`evaluate` groups queries by ``kind`` (and ``"all"``) and returns the mean of each
metric per group plus the query count (``"count"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from xmsearch.errors import InputError


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise InputError(f"retrieval metrics: k={k!r} must be a positive integer")


def _target_set(relevant: Mapping[str, int]) -> set[str]:
    top = max((g for g in relevant.values() if g > 0), default=0)
    if top <= 0:
        raise InputError("retrieval metrics: the query's relevant map has no id with a positive grade; "
                         "every evaluation query needs at least one relevant product")
    return {pid for pid, g in relevant.items() if g == top}


def _first_occurrences(ranked_ids: Iterable[str]) -> list[str | None]:
    """The list with repeated ids replaced by None (a later copy earns nothing)."""
    seen: set[str] = set()
    out: list[str | None] = []
    for pid in ranked_ids:
        out.append(None if pid in seen else pid)
        seen.add(pid)
    return out


def recall_at_k(ranked_ids: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """``|top-k ∩ R| / min(|R|, k)`` where ``R`` holds the ids of the highest grade."""
    _check_k(k)
    target = _target_set(relevant)
    hits = {pid for pid in ranked_ids[:k] if pid in target}
    return len(hits) / min(len(target), k)


def reciprocal_rank(ranked_ids: Sequence[str], relevant: Mapping[str, int]) -> float:
    """``1 / rank`` of the first id of the highest grade; 0 when none is ranked."""
    target = _target_set(relevant)
    for rank, pid in enumerate(ranked_ids, start=1):
        if pid in target:
            return 1.0 / rank
    return 0.0


def _dcg(grades: Iterable[int]) -> float:
    return sum((2.0**g - 1.0) / math.log2(rank + 1) for rank, g in enumerate(grades, start=1))


def ndcg_at_k(ranked_ids: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """nDCG@k with gain ``2^grade - 1`` and discount ``log2(rank + 1)``."""
    _check_k(k)
    _target_set(relevant)  # refuses a query with nothing relevant
    grades = [relevant.get(pid, 0) if pid is not None else 0 for pid in _first_occurrences(ranked_ids[:k])]
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    return _dcg(grades) / _dcg(ideal)


def query_scores(ranked: Sequence[str], relevant: Mapping[str, int], ks: Sequence[int] = (1, 5, 10),
                 ndcg_k: int = 10) -> dict[str, float]:
    """One query's ``recall@k`` for each of ``ks``, ``mrr`` (its reciprocal rank) and ``ndcg@{ndcg_k}``."""
    scores = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in ks}
    scores["mrr"] = reciprocal_rank(ranked, relevant)
    scores[f"ndcg@{ndcg_k}"] = ndcg_at_k(ranked, relevant, ndcg_k)
    return scores


def evaluate(results: Mapping[str, Sequence[str]], queries: Sequence[Mapping], ks: Sequence[int] = (1, 5, 10),
             ndcg_k: int = 10, group: Callable[[Mapping], str] | None = None) -> dict[str, dict[str, float]]:
    """Mean metrics per query kind (or per ``group(query)`` when given) and over all queries.

    ``results`` maps each ``qid`` to its ranked product ids; ``queries`` are rows with
    ``qid``, ``kind`` and ``relevant`` (as in the demo's ``queries.jsonl``).  Returns
    ``{kind: {"recall@1": ..., "recall@5": ..., "recall@10": ..., "mrr": ...,
    "ndcg@10": ..., "count": n}}`` with an ``"all"`` entry; kinds are sorted, ``"all"``
    comes last.  A query without results is an error, not a zero: it usually means the
    run and the query file do not match.
    """
    for k in ks:
        _check_k(k)
    _check_k(ndcg_k)
    if not queries:
        raise InputError("evaluate: the query list is empty; pass the rows of a queries file")
    per_query: dict[str, list[dict[str, float]]] = {}
    for q in queries:
        try:
            qid, kind, relevant = q["qid"], q["kind"], q["relevant"]
        except KeyError as exc:
            raise InputError(f"evaluate: a query row lacks the field {exc.args[0]!r}; rows need qid, kind and "
                             "relevant") from exc
        if qid not in results:
            raise InputError(f"evaluate: no results for query {qid!r}; search every query of the file "
                             "(or pass only the queries that were run)")
        try:
            scores = query_scores(list(results[qid]), relevant, ks, ndcg_k)
        except InputError as exc:
            raise InputError(f"evaluate: query {qid!r}: {exc}") from exc
        per_query.setdefault(group(q) if group else kind, []).append(scores)
        per_query.setdefault("all", []).append(scores)
    order = sorted(k for k in per_query if k != "all") + ["all"]
    return {kind: _mean(per_query[kind]) for kind in order}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {name: sum(r[name] for r in rows) / len(rows) for name in rows[0]}
    out["count"] = len(rows)
    return out
