"""``make demo``: the whole system on the demo catalogue, stage by stage, with timings.

generate catalogue -> train fusion -> export repository -> start tritonserver -> index
the catalogue over gRPC -> example queries of every kind -> evaluation next to the
raw-encoder baselines -> stop the server.  Stages whose outputs exist are reused
(the catalogue while its parameters are the same, the checkpoint while its catalogue,
encoders and training settings are) so a second run is quicker; ``--fresh`` redoes everything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from xmsearch.errors import XmsearchError

TIMINGS: list[tuple[str, float]] = []


@contextmanager
def stage(name: str):
    print(f"\n=== {name}", flush=True)
    t0 = time.time()
    yield
    dt = time.time() - t0
    TIMINGS.append((name, dt))
    print(f"--- {name}: {dt:.1f}s", flush=True)


def _bar(desc: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)


def _show(title: str, hits) -> None:
    print(f"\n{title}")
    for rank, h in enumerate(hits, start=1):
        m = h.metadata
        print(f"  {rank:2d}. {h.score:.3f} {h.id}  {m.get('title', '')}  "
              f"[{m.get('category', '?')}, {m.get('colour', m.get('color', '?'))}, {m.get('pattern', '?')}]")


def run(a: argparse.Namespace) -> None:
    from xmsearch import evaluate as ev
    from xmsearch import server as srv
    from xmsearch.checkpoint import FusionCheckpoint
    from xmsearch.client.embed import Embedder
    from xmsearch.client.ingest import ingest_catalog
    from xmsearch.cli import TrainingProgress
    from xmsearch.client.search import Searcher
    from xmsearch.demo import generate_demo_catalog
    from xmsearch.export.pipeline import export_repository
    from xmsearch.models.image import DEFAULT_IMAGE_MODEL
    from xmsearch.plots import evaluation_chart, results_sheet, training_curves, training_plot_path
    from xmsearch.train import (TrainConfig, cached_features, feature_cache_dir, features_path, stale_checkpoint,
                                train_catalog)

    root = Path(a.dir)
    catalog, queries_path = root / "catalog.jsonl", root / "queries.jsonl"
    ckpt = root / f"fusion-{a.text_model}.pt"
    index_dir = root / f"index-{a.text_model}"
    repository = Path(a.repository)
    stamp = root / "demo-params.json"
    params = {"n": a.n, "queries": a.queries, "seed": a.seed}
    if a.fresh and root.exists():
        shutil.rmtree(root)
    t_all = time.time()

    with stage("1. demo catalogue"):
        if catalog.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
            print(f"reusing {catalog}")
        else:
            summary = generate_demo_catalog(root, n=a.n, seed=a.seed, n_queries=a.queries, progress=True)
            stamp.write_text(json.dumps(params))
            print(json.dumps(summary, ensure_ascii=False, default=str)[:600])

    features = None  # the training features, reused as the baselines' catalogue side
    with stage("2. train fusion"):
        cfg = TrainConfig(seed=a.seed, **({} if a.epochs is None else {"epochs": a.epochs}))
        stale = "asked to by --retrain" if a.retrain else (
            "no checkpoint yet" if not ckpt.exists()
            else stale_checkpoint(ckpt, catalog, a.text_model, DEFAULT_IMAGE_MODEL, cfg))
        if stale is None:
            print(f"reusing {ckpt}: same catalogue, encoders and training settings (pass --retrain to train again)")
            # Its training features, when cached, spare the baselines encoding every photo again.
            features = cached_features(features_path(catalog, a.text_model, DEFAULT_IMAGE_MODEL, a.seed,
                                                     feature_cache_dir(ckpt)))
        else:
            if ckpt.exists():
                print(f"training again, not reusing {ckpt}: {stale}")
            bars = TrainingProgress(cfg.epochs)
            try:
                res = train_catalog(catalog, ckpt, a.text_model, DEFAULT_IMAGE_MODEL, cfg,
                                    progress=bars.progress, on_epoch=bars.on_epoch)
            finally:
                bars.close()
            features = res.features
            h0, h1 = res.history[0], res.history[-1]
            print(f"loss {h0['loss']:.3f} -> {h1['loss']:.3f}; held-out photo R@1 {h1['val_image_r1']:.3f}, "
                  f"title R@10 {h1['val_text_r10']:.3f} ({res.seconds:.1f}s)")
        history = FusionCheckpoint.load(ckpt).meta.get("history") if stale is None else res.history
        if history:
            print(f"training curves: {training_curves(history, training_plot_path(ckpt), f'fusion training: {ckpt.name}')}")

    with stage("3. export repository (cpu target)"):
        res = export_repository(repository, "cpu", ckpt, text_model=a.text_model,
                                step=lambda m: print(m, flush=True))
        print(f"fingerprint {res.fingerprint}, text encoder {res.text_precision}, fusion {res.fusion_precision}")

    with stage("4. start tritonserver"):
        server = srv.TritonServer(repository, grpc_port=a.grpc_port, http_port=a.http_port,
                                  metrics_port=a.metrics_port, log_file=root / "tritonserver.log")
        server.start(timeout=300)
        print(f"ready: gRPC {server.url}, HTTP {server.http_url}")
    try:
        emb = Embedder(server.url, timeout_s=120, retries=3)
        with stage("5. index the catalogue over gRPC"):
            if index_dir.exists():
                shutil.rmtree(index_dir)
            bar = _bar("indexing", a.n)
            report = ingest_catalog(catalog, index_dir, emb, photo_views=a.photo_views, alt_titles=a.alt_titles,
                                    progress=lambda d, t: (setattr(bar, "n", d), bar.refresh()))
            bar.close()
            print(report.summary())
        with stage("6. example queries"):
            searcher = Searcher(index_dir, emb)
            queries = ev.load_queries(queries_path)
            for text in ("blue down jacket", "蓝色羽绒服", "red striped dress"):
                _show(f"text query {text!r}", searcher.search(text=text, k=5))
            photo = next(q for q in queries if q["kind"] == "image")
            hits = searcher.search(image=photo["image"], k=5)
            _show(f"photo query {photo['image']} (a new photo of {list(photo['relevant'])[0]})", hits)
            print(f"   sheet: {results_sheet(hits, root / 'results-photo.png', query_image=photo['image'])}")
            both = next(q for q in queries if q["kind"] == "text_image")
            hits = searcher.search(text=both["text"], image=both["image"], k=5)
            _show(f"photo + text query {both['text']!r} with {Path(both['image']).name}", hits)
            print(f"   sheet: {results_sheet(hits, root / 'results-photo-text.png', both['text'], both['image'])}")
        with stage("7. evaluation (served model vs raw-encoder baselines)"):
            hits = ev.served_hits(searcher, queries)
            rows = ev.per_query_rows(hits, queries, metadata=ev.top_grade_metadata(searcher.index, queries))
            baselines = ev.run_baselines(catalog, queries, a.text_model, DEFAULT_IMAGE_MODEL, features=features)
            table = ev.report(ev.ranked_ids(hits), queries, baselines)
            print(ev.format_miss_table(ev.miss_table(rows)))
            (root / f"eval-{a.text_model}.json").write_text(json.dumps(table, indent=2))
            per_query = root / f"eval-{a.text_model}.per-query.jsonl"
            print(f"per-query results (the worst first): {ev.write_per_query(rows, per_query)}")
            print(f"chart: {evaluation_chart(table, root / f'eval-{a.text_model}.png', f'{a.text_model}: retrieval quality on {queries_path}')}")
            searcher.close()
        emb.close()
    finally:
        with stage("8. stop tritonserver"):
            server.stop()
    print("\nstage timings:")
    for name, dt in TIMINGS:
        print(f"  {name:55s} {dt:7.1f}s")
    print(f"  {'total':55s} {time.time() - t_all:7.1f}s")


def main(argv: list[str] | None = None) -> int:
    from xmsearch.models.text import DEFAULT_TEXT_MODEL

    p = argparse.ArgumentParser(prog="python -m xmsearch.demo_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="demo", help="working folder (default: demo)")
    p.add_argument("--n", type=int, default=1500, help="catalogue size")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="training epochs (default: xmsearch train's)")
    p.add_argument("--text-model", default=DEFAULT_TEXT_MODEL)
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--photo-views", type=int, default=3, metavar="N",
                   help="re-shots of each photo averaged into its photo-side vector at indexing "
                        "(xmsearch index --photo-views; default 3)")
    p.add_argument("--alt-titles", action=argparse.BooleanOptionalAction, default=True,
                   help="mix each item's other titles into its vector at indexing "
                        "(xmsearch index --alt-titles; default on)")
    p.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    p.add_argument("--fresh", action="store_true", help="delete the working folder first")
    a = p.parse_args(argv)
    try:
        run(a)
    except XmsearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
