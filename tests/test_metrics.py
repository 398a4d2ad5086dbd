"""Retrieval metrics against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from xmsearch.errors import InputError
from xmsearch.metrics import evaluate, ndcg_at_k, recall_at_k, reciprocal_rank

LOG2_3 = math.log2(3)  # 1.5849625...

# Graded fixture: a and b are the targets (grade 2), c and d are partial matches (grade 1).
RELEVANT = {"a": 2, "b": 2, "c": 1, "d": 1}
RANKED = ["x", "a", "c", "b", "y", "d"]


def test_recall_counts_only_the_highest_grade():
    # R = {a, b}.  top-1 = [x]: 0 hits / min(2, 1) = 0.
    assert recall_at_k(RANKED, RELEVANT, 1) == 0.0
    # top-2 = [x, a]: 1 hit / min(2, 2) = 0.5.
    assert recall_at_k(RANKED, RELEVANT, 2) == 0.5
    # top-3 = [x, a, c]: c is grade 1, not a target: still 1 / 2.
    assert recall_at_k(RANKED, RELEVANT, 3) == 0.5
    # top-5 = [x, a, c, b, y]: 2 hits / min(2, 5) = 1.
    assert recall_at_k(RANKED, RELEVANT, 5) == 1.0


def test_recall_divides_by_k_when_the_target_set_is_larger():
    # R = {a, b, c} (all grade 1), k = 2, top-2 = [a, b]: 2 / min(3, 2) = 1.
    assert recall_at_k(["a", "b", "z"], {"a": 1, "b": 1, "c": 1}, 2) == 1.0
    # top-2 = [a, z]: 1 / 2.
    assert recall_at_k(["a", "z", "b"], {"a": 1, "b": 1, "c": 1}, 2) == 0.5


def test_reciprocal_rank_is_one_over_the_first_target_rank():
    # First id of R = {a, b} is a at rank 2 -> 1/2 (c at rank 3 is grade 1 and does not count).
    assert reciprocal_rank(RANKED, RELEVANT) == 0.5
    # c (grade 1) first, then a at rank 3 -> 1/3.
    assert reciprocal_rank(["c", "d", "a"], RELEVANT) == pytest.approx(1 / 3)
    # No target at all -> 0.
    assert reciprocal_rank(["c", "d", "x"], RELEVANT) == 0.0


def test_ndcg_by_hand():
    # k = 3, grades at ranks 1..3 = [0, 2, 1]:
    #   DCG  = 0 + (2^2-1)/log2(3) + (2^1-1)/log2(4) = 3/1.58496 + 1/2 = 2.39279
    # ideal grades from the map, best first, top 3 = [2, 2, 1]:
    #   IDCG = 3/log2(2) + 3/log2(3) + 1/log2(4)     = 3 + 1.89279 + 0.5 = 5.39279
    #   nDCG = 2.39279 / 5.39279 = 0.44370
    assert ndcg_at_k(RANKED, RELEVANT, 3) == pytest.approx(0.44370, abs=1e-5)
    assert ndcg_at_k(RANKED, RELEVANT, 3) == pytest.approx((3 / LOG2_3 + 0.5) / (3 + 3 / LOG2_3 + 0.5))
    # k = 10, list [a, b, c, d] is the ideal order -> 1.
    assert ndcg_at_k(["a", "b", "c", "d"], RELEVANT, 10) == pytest.approx(1.0)
    # Nothing relevant ranked -> 0.
    assert ndcg_at_k(["x", "y"], RELEVANT, 10) == 0.0


def test_duplicates_count_once():
    # [a, a, a] with R = {a, b}: recall@2 = 1 distinct hit / min(2, 2) = 0.5, not 1.
    relevant = {"a": 2, "b": 2}
    assert recall_at_k(["a", "a", "a"], relevant, 2) == 0.5
    # DCG@3 = 3/log2(2) + 0 + 0 = 3; IDCG@3 = 3 + 3/log2(3) = 4.89279 -> 0.61315.
    assert ndcg_at_k(["a", "a", "a"], relevant, 3) == pytest.approx(0.61315, abs=1e-5)


def test_evaluate_groups_by_kind_by_hand():
    queries = [
        {"qid": "q1", "kind": "text", "relevant": {"a": 2, "c": 1}},
        {"qid": "q2", "kind": "image", "relevant": {"b": 2}},
        {"qid": "q3", "kind": "image", "relevant": {"b": 2}},
    ]
    results = {"q1": ["c", "a"], "q2": ["b"], "q3": ["x", "y"]}
    out = evaluate(results, queries)
    assert list(out) == ["image", "text", "all"]
    # q1: R = {a}; rank 1 is c -> R@1 = 0; a at rank 2 -> R@5 = R@10 = 1, RR = 1/2.
    #     DCG@10 = (2^1-1)/1 + (2^2-1)/log2(3) = 1 + 1.89279 = 2.89279
    #     IDCG   = 3/1 + 1/log2(3)             = 3 + 0.63093 = 3.63093  -> nDCG 0.79671
    ndcg_q1 = (1 + 3 / LOG2_3) / (3 + 1 / LOG2_3)
    assert ndcg_q1 == pytest.approx(0.79671, abs=1e-5)
    assert out["text"] == pytest.approx({"recall@1": 0.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 0.5,
                                         "ndcg@10": ndcg_q1, "count": 1})
    # q2 is perfect (all 1), q3 finds nothing (all 0): image means are 1/2, count 2.
    assert out["image"] == pytest.approx({"recall@1": 0.5, "recall@5": 0.5, "recall@10": 0.5, "mrr": 0.5,
                                          "ndcg@10": 0.5, "count": 2})
    # all: R@1 = (0+1+0)/3, R@5 = (1+1+0)/3, MRR = (0.5+1+0)/3, nDCG = (0.79671+1+0)/3.
    assert out["all"] == pytest.approx({"recall@1": 1 / 3, "recall@5": 2 / 3, "recall@10": 2 / 3, "mrr": 0.5,
                                        "ndcg@10": (ndcg_q1 + 1) / 3, "count": 3})


def test_evaluate_other_cutoffs():
    queries = [{"qid": "q1", "kind": "text", "relevant": {"a": 2}}]
    # a at rank 3: R@2 = 0, R@3 = 1; nDCG@3 = (3/log2(4)) / 3 = 0.5.
    out = evaluate({"q1": ["x", "y", "a"]}, queries, ks=(2, 3), ndcg_k=3)
    assert out["all"] == pytest.approx({"recall@2": 0.0, "recall@3": 1.0, "mrr": 1 / 3, "ndcg@3": 0.5,
                                        "count": 1})


@pytest.mark.parametrize(
    "call",
    [
        lambda: recall_at_k(["a"], {"a": 2}, 0),
        lambda: ndcg_at_k(["a"], {"a": 2}, -1),
        lambda: recall_at_k(["a"], {}, 1),
        lambda: reciprocal_rank(["a"], {"a": 0}),
        lambda: ndcg_at_k(["a"], {}, 10),
        lambda: evaluate({}, [{"qid": "q1", "kind": "text", "relevant": {"a": 2}}]),
        lambda: evaluate({"q1": ["a"]}, [{"qid": "q1", "kind": "text"}]),
        lambda: evaluate({"q1": ["a"]}, []),
    ],
    ids=["k=0", "k<0", "empty-relevant", "zero-grades", "ndcg-empty", "missing-results", "missing-field",
         "no-queries"],
)
def test_bad_input_is_an_input_error(call):
    with pytest.raises(InputError):
        call()


def test_missing_results_error_names_the_query():
    with pytest.raises(InputError, match="q7"):
        evaluate({"q1": ["a"]}, [{"qid": "q1", "kind": "text", "relevant": {"a": 2}},
                                 {"qid": "q7", "kind": "image", "relevant": {"b": 2}}])
