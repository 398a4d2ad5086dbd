"""Side-by-side retrieval quality of training variants, on one catalogue's query set.

Every variant is a set of :class:`xmsearch.train.TrainConfig` overrides; each is trained
on the same cached frozen-encoder features (the ones ``xmsearch train`` / ``make demo``
cached next to the checkpoint) for each seed, and evaluated in process on the catalogue's
``queries.jsonl`` with :func:`xmsearch.metrics.evaluate`: the fusion module's three entry
points against the item embeddings, exact cosine search.  That is what the served
ensembles and the FAISS Flat index compute, so the figures equal ``xmsearch eval``'s to
about 3 decimals, at a fraction of the cost (no export, server or index).

    .venv/bin/python -m benchmarks.quality_ab --catalog demo \\
        --variant base: --variant grouped:group_size=4 --seeds 0 1 \\
        --out benchmarks/results/quality_ab.md

A variant is ``NAME:KEY=VALUE,KEY=VALUE`` (``NAME:`` alone for the defaults).  Seeds
change the initialisation and the batch order, not the features: the spread between
seeds is the noise level a difference has to clear.  ``--item-mix M ...`` evaluates each
trained model once per stored-item mix (``AttentionFusion.item_mix``, set after training),
one row each, without training again; ``--photo-views N ...`` likewise once per number of
re-shots averaged into the photo-side vectors (``xmsearch index --photo-views``: the same
re-shots, rendered here and encoded by the frozen image encoder).

The demo's ``queries.jsonl`` is its evaluation set, the figures the README reports.  A
setting chosen by its figures on that same set would flatter them, so settings are chosen on
a development set of the same catalogue, disjoint from it, and confirmed on the evaluation
set after::

    .venv/bin/xmsearch demo-catalog --out /tmp/dev --first-query 300 --queries 600
    .venv/bin/python -m benchmarks.quality_ab --catalog demo --dev-queries /tmp/dev/queries.jsonl ...

(``--first-query 300`` draws queries 301-900 of the same seed's catalogue.)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from benchmarks import publish
from xmsearch.catalog import alt_titles, read_catalog
from xmsearch.client.ingest import ALT_TITLE_WEIGHT, mix_in
from xmsearch.client.index import MAX_PHOTO_VIEWS, PHOTO_RERANK_DEPTH
from xmsearch.evaluate import load_queries
from xmsearch.metrics import evaluate
from xmsearch.models.image import DEFAULT_IMAGE_MODEL
from xmsearch.pipeline import Encoders
from xmsearch.train import Features, TrainConfig, load_or_compute_features, train_fusion

# Query sets: the catalogue's queries.jsonl (what the README reports) and an optional
# development set of the same catalogue, disjoint from it, to choose settings on.
EVAL, DEV = "eval", "dev"
# The figure per query kind that issue #4's quality bar is about.
HEADLINE = {"text": "recall@10", "image": "recall@1", "text_image": "recall@10"}


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"name:epochs=10,lr=0.001"`` -> ``("name", {"epochs": 10, "lr": 0.001})``."""
    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"variant {spec!r}: give it a name, as NAME:KEY=VALUE,...")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"variant {spec!r}: {item!r} is not KEY=VALUE with KEY one of {sorted(fields)}")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return name, overrides


@torch.no_grad()
def query_features(enc: Encoders, queries: list[dict]) -> dict:
    """Frozen-encoder outputs of every query, computed once for all variants."""
    out = {}
    for q in queries:
        text = image = None
        if q.get("text"):
            text = enc.text_states([q["text"]], "query")
        if q.get("image"):
            image = enc.image_regions([Path(q["image"]).read_bytes()])
        out[q["qid"]] = (text, image)
    return out


def photo_view_regions(enc: Encoders, rows: list, views: int, batch: int = 64) -> torch.Tensor:
    """[N, views, R, Hi] fp16: the frozen image encoder's regions of the re-shots that
    ``ingest_catalog(photo_views=views)`` renders for each item (the first k of them are
    what ``photo_views=k`` renders)."""
    from xmsearch.reshoot import photo_views

    out = []
    step = max(1, batch // views)
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step]
        shots = [s for r in chunk for s in photo_views(r.image.read_bytes(), r.id, views)]
        r = enc.image_regions(shots)  # item-major: each item's re-shots together
        out.append(r.view(len(chunk), views, *r.shape[1:]).half())
    return torch.cat(out)


def alt_title_states(enc: Encoders, rows: list, batch: int = 64) -> tuple[list, torch.Tensor]:
    """The frozen text encoder's query-role states of every item's other titles
    (:func:`xmsearch.catalog.alt_titles`, what ``ingest_catalog(alt_titles=True)`` embeds through
    ``query_text``), in batches, and the item row each title belongs to."""
    texts, owners = [], []
    for i, r in enumerate(rows):
        for t in alt_titles(r):
            texts.append(t)
            owners.append(i)
    return [enc.text_states(texts[j:j + batch], "query") for j in range(0, len(texts), batch)], \
        torch.tensor(owners, dtype=torch.long)


@torch.no_grad()
def rank(fusion, f: Features, qf: dict, queries: list[dict], k: int = 10, bs: int = 256,
         view_regions: torch.Tensor | None = None, alt: tuple | None = None) -> dict[str, list[str]]:
    """Top-k catalogue ids per query: what the served ensembles + a Flat index return.
    ``view_regions`` [N, V, R, Hi]: photo-side vectors with those V re-shots averaged in, as
    ``ingest_catalog(photo_views=V)`` stores them; ``alt`` (:func:`alt_title_states`): stored
    vectors with the items' other titles mixed in, as ``ingest_catalog(alt_titles=True)`` does."""
    fusion.eval()
    items = [fusion.encode_item_vectors(f.item_states[i:i + bs].float(), f.item_mask[i:i + bs],
                                        f.regions[i:i + bs, 0].float()) for i in range(0, len(f.ids), bs)]
    z = torch.cat([v for v, _ in items])
    photo = torch.cat([p for _, p in items])
    if alt is not None and len(alt[1]):
        batches, owners = alt
        e = torch.cat([fusion.encode_text(s, m) for s, m in batches])
        z = torch.from_numpy(mix_in(z.numpy(), owners.numpy(), e.numpy(), ALT_TITLE_WEIGHT))
    if view_regions is not None and view_regions.shape[1]:
        views = view_regions.shape[1]
        shots = torch.cat([torch.stack([fusion.encode_image(view_regions[i:i + bs, v].float())
                                        for v in range(views)], 1)
                           for i in range(0, len(f.ids), bs)])  # [N, views, D]
        photo = torch.from_numpy(mix_in(photo.numpy(), torch.arange(len(f.ids)).repeat_interleave(views).numpy(),
                                        shots.flatten(0, 1).numpy()))
    out = {}
    for q in queries:
        text, image = qf[q["qid"]]
        if text is not None and image is not None:
            e = fusion.encode_joint(text[0], text[1], image, query=True)
        elif text is not None:
            e = fusion.encode_text(*text)
        else:
            e = fusion.encode_image(image)
        if text is None:  # CatalogIndex.search_photo: candidates ranked again by photo-side vectors
            cand = (e[0] @ z.T).topk(min(max(k, PHOTO_RERANK_DEPTH), len(f.ids))).indices
            top = cand[(photo[cand] @ e[0]).argsort(descending=True, stable=True)[:k]].tolist()
        else:
            top = (e[0] @ z.T).topk(k).indices.tolist()
        out[q["qid"]] = [f.ids[i] for i in top]
    return out


def run(catalog: Path, variants: list[tuple[str, dict]], seeds: list[int], text_model: str,
        image_model: str, cache_dir: Path, log=print, item_mixes: list[float] | None = None,
        dev_queries: Path | None = None, photo_views: list[int] | None = None,
        alt_title_settings: list[bool] | None = None) -> list[dict]:
    rows, _ = read_catalog(catalog / "catalog.jsonl")
    query_sets = {EVAL: load_queries(catalog / "queries.jsonl")}
    if dev_queries is not None:
        query_sets[DEV] = load_queries(dev_queries)
    enc = Encoders.load(text_model, image_model)
    t0 = time.time()
    feats = load_or_compute_features(catalog / "catalog.jsonl", enc, rows, cache_dir, seed=0)
    if enc.image_session is None:  # the cache was there: still encode the query photos with ORT
        enc.use_onnx_images(cache_dir)
    qfs = {name: query_features(enc, qs) for name, qs in query_sets.items()}
    view_regions = photo_view_regions(enc, rows, max(photo_views)) if photo_views and max(photo_views) else None
    alt = alt_title_states(enc, rows) if alt_title_settings and any(alt_title_settings) else None
    log(f"features for {len(rows)} items and "
        + " + ".join(f"{len(qs)} {name} queries" for name, qs in query_sets.items()) + f": {time.time() - t0:.0f} s")
    results = []
    for name, overrides in variants:
        for seed in seeds:
            cfg = TrainConfig(**{**overrides, "seed": seed})
            t1 = time.time()
            fusion = train_fusion(feats, text_model, image_model, cfg).checkpoint.fusion
            train_s = round(time.time() - t1, 1)
            for mix, views, titles in [(m, v, t) for m in item_mixes or [None] for v in photo_views or [None]
                                       for t in alt_title_settings or [None]]:
                label, over = name, overrides
                if mix is not None:
                    fusion.item_mix = mix
                    label, over = f"{label} @ item_mix {mix:g}", {**over, "item_mix": mix}
                if views is not None:
                    label, over = f"{label} @ photo_views {views}", {**over, "photo_views": views}
                if titles is not None:
                    label, over = f"{label} @ alt_titles {'on' if titles else 'off'}", {**over, "alt_titles": titles}
                shots = view_regions[:, :views] if views else None
                for qname, queries in query_sets.items():
                    metrics = evaluate(rank(fusion, feats, qfs[qname], queries, view_regions=shots,
                                            alt=alt if titles else None), queries)
                    results.append({"variant": label, "overrides": over, "seed": seed, "queries": qname,
                                    "train_s": train_s, "metrics": metrics})
                    log(f"{label} seed {seed}" + (f" ({qname} queries)" if dev_queries else "") + ": " + "  ".join(
                        f"{kind} {m}={metrics[kind][m]:.3f}" for kind, m in HEADLINE.items() if kind in metrics)
                        + f"  ({time.time() - t1:.0f} s)")
    return results


def table(results: list[dict]) -> str:
    kinds = [k for k in HEADLINE if any(k in r["metrics"] for r in results)]
    head = ["variant", "overrides", "seeds"] + [f"{k} {HEADLINE[k]}" for k in kinds] + ["nDCG@10 (all)", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for name, qname in dict.fromkeys((r["variant"], r.get("queries", EVAL)) for r in results):
        rs = [r for r in results if r["variant"] == name and r.get("queries", EVAL) == qname]

        def cell(kind, metric):
            vals = [r["metrics"][kind][metric] for r in rs]
            mean = statistics.fmean(vals)
            return f"{mean:.3f}" + (f" ({min(vals):.3f}-{max(vals):.3f})" if len(vals) > 1 else "")

        over = ", ".join(f"{k}={v}" for k, v in rs[0]["overrides"].items()) or "defaults"
        label = name if qname == EVAL else f"{name}, {qname} queries"
        lines.append("| " + " | ".join([label, over, " ".join(str(r["seed"]) for r in rs)]
                                       + [cell(k, HEADLINE[k]) for k in kinds] + [cell("all", "ndcg@10")]
                                       + [f"{statistics.fmean(r['train_s'] for r in rs):.0f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--catalog", type=Path, required=True, help="dir with catalog.jsonl and queries.jsonl")
    p.add_argument("--variant", action="append", required=True, help="NAME:KEY=VALUE,... (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--item-mix", type=float, nargs="+", metavar="M",
                   help="evaluate each trained model with these stored-item mixes (one row each)")
    p.add_argument("--photo-views", type=int, nargs="+", metavar="N",
                   help="evaluate each trained model with photo-side vectors that average N re-shots "
                        "of each photo, as xmsearch index --photo-views N stores them (one row each)")
    p.add_argument("--alt-titles", choices=("off", "on"), nargs="+",
                   help="evaluate each trained model with stored vectors without / with the items' other "
                        "titles mixed in, as xmsearch index --alt-titles stores them (one row each)")
    p.add_argument("--text-model", default="multilingual-e5-small-q4")
    p.add_argument("--image-model", default=DEFAULT_IMAGE_MODEL)
    p.add_argument("--cache-dir", type=Path, help="feature cache (default CATALOG/.feature-cache, where make demo puts it)")
    p.add_argument("--dev-queries", type=Path, metavar="FILE",
                   help="also evaluate on this query set of the same catalogue, one row per variant "
                        "marked 'dev queries'; pick settings there, not on CATALOG/queries.jsonl")
    p.add_argument("--out", type=Path, help="also write the table (markdown, with this command) here")
    a = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in a.variant]
    except ValueError as e:
        p.error(str(e))
    if any(not 0 <= v <= MAX_PHOTO_VIEWS for v in a.photo_views or []):
        p.error(f"--photo-views: each count must be from 0 to {MAX_PHOTO_VIEWS}, got {a.photo_views}")
    results = run(a.catalog, variants, a.seeds, a.text_model, a.image_model,
                  a.cache_dir or a.catalog / ".feature-cache", item_mixes=a.item_mix,
                  dev_queries=a.dev_queries, photo_views=a.photo_views,
                  alt_title_settings=[t == "on" for t in a.alt_titles] if a.alt_titles else None)
    text = table(results)
    publish(text, a.out, "benchmarks.quality_ab", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
