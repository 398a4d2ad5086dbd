"""What int8 does to the served text encoder: speed side by side, and how far the vectors move.

For each text model this exports the text encoder graph as ``xmsearch export`` does and
compares three graphs of it in ONNX Runtime as the cpu target runs them (2 threads, idle
threads not spinning):

* ``fp32``: the exported graph;
* ``int8 per run``: onnxruntime's ``quantize_dynamic`` (weights per output channel, one
  activation scale per run over the whole batch), the served int8 before 2026-12-06;
* ``int8 per token``: ``--text-precision int8`` today (``xmsearch.export.quantize``: one
  activation scale per token).

Figures: milliseconds per call, rounds alternated, for one query (query role) and batches
of 8 and 32 catalogue titles (passage role); the per-token cosine of each graph's states
with PyTorch's, the figure the export checks (``INT8_MIN_COSINE``), over the catalogue's
titles; the largest |difference| of a title's states computed alone and in a batch of 16
(what Triton's dynamic batching does to a served vector; the export checks it,
``INT8_MAX_BATCH_DRIFT``); and the raw encoder's own retrieval with each graph
(mean-pooled states, text query vs titles, the baseline ``xmsearch eval --baselines``
prints) on the catalogue's text queries.

The fused, served figures come from ``xmsearch eval`` on the exports (README, "Text encoder
precision").

    .venv/bin/python -m benchmarks.text_int8 --catalog demo \\
        --out benchmarks/results/text_int8.md
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from benchmarks import catalogue_parser, parse_catalogue_args, publish
from benchmarks.loadgen import alternated_ms_per_call

MODELS = ("minilm-l6", "multilingual-e5-small-q4")


def _pooled(states, mask):
    import numpy as np

    v = (states * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _encode(session, pre, texts: list[str], role: str, batch: int = 64):
    import numpy as np

    from xmsearch import spec as S

    out = []
    for i in range(0, len(texts), batch):
        ids, mask = pre.encode(texts[i:i + batch], role)
        states = session.run([S.TOKEN_STATES], {S.INPUT_IDS: ids, S.ATTENTION_MASK: mask})[0]
        out.append(_pooled(states, mask))
    return np.concatenate(out)


VARIANTS = ("fp32", "int8 per run", "int8 per token")


def compare(text_model: str, catalog: Path, rounds: int, seconds: float, max_titles: int) -> tuple[dict, dict]:
    """(timings {(variant, measure): [ms per round]}, figures {variant: {...}}) for one text model."""
    import logging

    import numpy as np
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from xmsearch import spec as S
    from xmsearch.catalog import read_catalog
    from xmsearch.evaluate import load_queries
    from xmsearch.export.onnx import export_onnx, onnx_session
    from xmsearch.export.quantize import batch_drift, check_int8_parity, quantize_int8
    from xmsearch.metrics import evaluate
    from xmsearch.models.text import TextEncoder, resolve_text_model
    from xmsearch.preprocess import TextPreprocessor

    source = resolve_text_model(text_model)
    encoder = TextEncoder(source).eval()
    pre = TextPreprocessor(encoder.tokenizer_json(), source.preprocess)
    rows, _ = read_catalog(catalog / "catalog.jsonl")
    titles = [r.title for r in rows]
    queries = [q for q in load_queries(catalog / "queries.jsonl") if q.get("text") and not q.get("image")]
    ids, mask = (torch.from_numpy(a) for a in pre.encode(titles[:8], "passage"))
    spec = S.member_specs(S.Dims(text_dim=encoder.dim, image_dim=1, embed_dim=256))[S.TEXT_ENCODER]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(encoder, spec, (ids[:2], mask[:2]), Path(tmp) / "fp32.onnx")
        per_run = Path(tmp) / "per_run.onnx"
        root = logging.getLogger()  # quantize_dynamic gives static-quantization advice through it
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(fp32), str(per_run), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        paths = dict(zip(VARIANTS, (fp32, per_run, quantize_int8(fp32, Path(tmp) / "per_token.onnx"))))
        sessions = {v: onnx_session(path, threads=2, spinning=False) for v, path in paths.items()}
        checked = [tuple(torch.from_numpy(a) for a in pre.encode(titles[i:i + 64], "passage"))
                   for i in range(0, min(len(titles), max_titles), 64)]
        drift_batch = pre.encode(titles[:16], "passage")
        figures: dict = {"queries": len(queries), "titles": len(titles), "checked": len(checked)}
        for v, sess in sessions.items():  # the export's own measures, without its bounds
            figures[v] = {"cosine": check_int8_parity(encoder, paths[v], checked, min_cosine=-1.0,
                                                      session=sess).min_cosine,
                          "drift": batch_drift(sess, *drift_batch)}
        feeds = {"one query": pre.encode([queries[0]["text"] if queries else titles[0]], "query"),
                 "8 titles": pre.encode(titles[8:16], "passage"),
                 "32 titles": pre.encode(titles[-32:], "passage")}
        points: dict[tuple[str, str], list[float]] = {}
        for label, (i, m) in feeds.items():
            feed = {S.INPUT_IDS: i, S.ATTENTION_MASK: m}
            timed = alternated_ms_per_call({v: (lambda s=s: s.run(None, feed)) for v, s in sessions.items()},
                                           rounds, seconds)
            points.update({(v, f"{label} ({i.shape[0]}x{i.shape[1]} tokens), ms per call"): ms
                           for v, ms in timed.items()})
        if queries:
            item_ids = [r.id for r in rows]
            for v, s in sessions.items():
                z = _encode(s, pre, titles, "passage")
                q = _encode(s, pre, [x["text"] for x in queries], "query")
                top = np.argsort(-(q @ z.T), axis=1)[:, :10]
                ranked = {x["qid"]: [item_ids[j] for j in row] for x, row in zip(queries, top)}
                figures[v]["retrieval"] = evaluate(ranked, queries)["all"]
    return points, figures


def timing_table(points: dict[tuple[str, str], list[float]]) -> str:
    """Per measure: each variant's median (min-max) and per token's ratio to per run and to fp32."""
    import statistics

    fp32, per_run, per_token = VARIANTS
    lines = ["| measure | " + " | ".join(VARIANTS) + f" | {per_token} / {per_run} | {per_token} / {fp32} |",
             "|---|" + "---:|" * (len(VARIANTS) + 2)]
    for metric in dict.fromkeys(m for _, m in points):
        med = {v: statistics.median(points[(v, metric)]) for v in VARIANTS}
        cells = [f"{med[v]:.2f} ({min(points[(v, metric)]):.2f}-{max(points[(v, metric)]):.2f})" for v in VARIANTS]
        lines.append(f"| {metric} | " + " | ".join(cells)
                     + f" | {med[per_token] / med[per_run]:.2f}x | {med[per_token] / med[fp32]:.2f}x |")
    return "\n".join(lines)


def run(models: Sequence[str], catalog: Path, rounds: int, seconds: float, max_titles: int = 512) -> str:
    parts = [f"ONNX Runtime, 2 threads, idle threads not spinning; medians over {rounds} alternated rounds "
             f"(min-max), {seconds:g} s each. Catalogue `{catalog}`."]
    for model in models:
        points, fig = compare(model, Path(catalog), rounds, seconds, max_titles)
        lines = ["| graph | min per-token cosine with PyTorch | alone vs in a batch of 16, max abs diff |",
                 "|---|---:|---:|"]
        lines += [f"| {v} | {fig[v]['cosine']:.4f} | {fig[v]['drift']:.2g} |" for v in VARIANTS]
        parts.append(f"### {model}\n\n" + timing_table(points) + "\n\n"
                     f"States over {fig['checked']} batches of up to 64 titles (real tokens only; the export "
                     "refuses an int8 graph below the cosine bound or above the drift bound in "
                     "`xmsearch.export.quantize`), and the first 16 titles each alone and batched:\n\n"
                     + "\n".join(lines))
        if fig["queries"]:
            lines = ["| raw encoder, mean-pooled, graph | R@1 | R@10 | MRR | nDCG@10 |", "|---|---:|---:|---:|---:|"]
            for v in VARIANTS:
                m = fig[v]["retrieval"]
                lines.append(f"| {v} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} "
                             f"| {m['ndcg@10']:.3f} |")
            parts.append(f"Raw-encoder retrieval, {fig['queries']} text queries against {fig['titles']} "
                         "titles:\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = catalogue_parser(__doc__)
    p.add_argument("--text-model", action="append", dest="models", metavar="NAME",
                   help=f"text model (repeat; default: {', '.join(MODELS)})")
    a = parse_catalogue_args(p, argv)
    publish(run(a.models or MODELS, a.catalog, a.rounds, a.seconds), a.out, "benchmarks.text_int8", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
