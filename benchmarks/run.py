"""Run every benchmark and write the report (``make bench``; ``QUICK=1`` adds ``--quick``).

    python -m benchmarks.run [--quick] [--url HOST:PORT] [--catalog DIR] [--fusion CKPT]
                             [--text-model NAME] [--out DIR] [--only faiss|perf|e2e] ...

Self-contained by default: without ``--url`` it generates a small demo catalogue, exports
a cpu-target repository (``--fusion CKPT`` if given, else untrained weights: speed does
not depend on them) into ``benchmarks/.cache/``, starts a private tritonserver on free
ports, and measures

1. perf_analyzer sweeps of the four ensembles and the members text_encoder,
   image_encoder and fusion_joint;
2. the xmsearch client end to end: ``ingest_catalog`` items/s, ``Searcher.search``
   latency and queries/s at 1, 4, 16 threads (text and image), and text queries at 16
   threads sent one request per query; then, the server still up, the text queries at 16
   threads and the ONNX Runtime batched baseline in alternated rounds (``text_ratio``);
3. the in-process baselines on the same queries: PyTorch ReferencePipeline and ONNX
   Runtime on the exported graphs, one query at a time and batched, and the issue's
   served/baseline ratios with a verdict per target;
4. (full mode) query_text served with multilingual-e5-small-q4 next to MiniLM-L6;
5. the FAISS index benchmark (batched and single-query default rules);

then stops the server and writes REPORT.md and plots.  ``--quick`` writes to
``benchmarks/results/quick`` so a short run never replaces the full results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks import faiss_bench, input_data, perf_sweep, report
from xmsearch import spec
from xmsearch.errors import XmsearchError

log = logging.getLogger("benchmarks.run")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MEMBERS = (spec.TEXT_ENCODER, spec.IMAGE_ENCODER, spec.FUSION_JOINT)
E5_MODEL = "multilingual-e5-small-q4"


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run (full or quick)."""

    catalogue_items: int
    catalogue_queries: int
    ensemble_sweep: perf_sweep.SweepSettings
    member_concurrency: tuple[int, ...]
    ensembles: tuple[str, ...]
    members: tuple[str, ...]
    search_duration_s: float
    search_warmup_s: float
    baseline_duration_s: float
    baseline_batches: tuple[int, ...]
    e5_concurrency: tuple[int, ...]
    faiss_sizes: tuple[int, ...] | None  # None: faiss_bench's own default for the mode
    ingest_rounds: int = 1  # catalogue ingests; the median one is reported (one takes seconds: a stall moves it)
    # Items of the ingest's own generated catalogue (None: the query catalogue's): enough that
    # start-up and the last requests' drain weigh little against the steady rate.
    ingest_items: int | None = None
    # Served text queries and the ONNX Runtime baseline again, in alternated rounds with the
    # server up (benchmarks.text_ratio): the sequential figures above sit minutes apart.
    ratio_rounds: int = 4
    ratio_seconds: float = 4.0


# 1.5 s windows and a 30 % band: a shared 2-core machine rarely gives 3 windows within
# perf_analyzer's default 10 %; 7 models x up to 7 levels must fit the 20-minute budget.
FULL = Plan(catalogue_items=300, catalogue_queries=90,
            ensemble_sweep=perf_sweep.SweepSettings(measurement_interval_ms=1500, stability_percentage=30.0,
                                                    max_trials=6),
            member_concurrency=(1, 4, 16, 64), ensembles=spec.ENSEMBLES, members=MEMBERS, search_duration_s=5.0, search_warmup_s=1.0,
            baseline_duration_s=4.0, baseline_batches=(16, 32), e5_concurrency=(1, 16), faiss_sizes=None,
            ingest_rounds=3, ingest_items=1200)
QUICK = Plan(catalogue_items=100, catalogue_queries=30,
             ensemble_sweep=perf_sweep.SweepSettings(concurrency=(1, 16), measurement_interval_ms=1000,
                                                     stability_percentage=50.0, max_trials=5),
             member_concurrency=(16,), ensembles=(spec.QUERY_TEXT, spec.QUERY_IMAGE),
             members=(spec.IMAGE_ENCODER,), search_duration_s=1.5, search_warmup_s=0.5,
             baseline_duration_s=1.5, baseline_batches=(16,), e5_concurrency=(), faiss_sizes=(20_000,),
             ratio_rounds=1, ratio_seconds=1.0)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _say(msg: str) -> None:
    print(msg, flush=True)


# --- perf_analyzer -------------------------------------------------------------------------

def _server_state(url: str, models: list[str]) -> tuple[str | None, list[str], str]:
    """(server version, ready models, reason when unreachable) for the gRPC endpoint."""
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        if not client.is_server_live(client_timeout=3.0):
            return None, [], f"server at {url} is not live"
        version = client.get_server_metadata(client_timeout=3.0).version
        ready = [m for m in models if client.is_model_ready(m, client_timeout=3.0)]
        return version, ready, ""
    except Exception as e:  # any connection failure means "no server here"
        return None, [], f"no Triton server reachable at {url} ({type(e).__name__})"


def sweep_settings(args: argparse.Namespace, plan: Plan) -> perf_sweep.SweepSettings:
    settings = plan.ensemble_sweep
    overrides: dict = {"collect_metrics": args.collect_metrics or settings.collect_metrics}
    if args.measurement_interval:
        overrides["measurement_interval_ms"] = args.measurement_interval
    if args.stability_percentage:
        overrides["stability_percentage"] = args.stability_percentage
    if args.concurrency:
        overrides["concurrency"] = tuple(args.concurrency)
    return replace(settings, **overrides)


def run_perf(args: argparse.Namespace, plan: Plan, url: str, catalog: Path | None, out: Path,
             member_inputs: dict[str, Path] | None = None, metrics_url: str | None = None
             ) -> tuple[dict[str, str], list[str]]:
    """Sweep every ready ensemble (and members with input data); returns (versions, failed models)."""
    models = args.models or plan.ensembles
    wanted = {kind: model for kind, model in input_data.KIND_MODEL.items() if model in models}
    members = dict(member_inputs or {})
    version, ready, reason = _server_state(url, [*wanted.values(), *members])
    if reason:
        _say(f"perf_analyzer: skipped -- {reason}. Start the server first or pass --url.")
        return {}, []
    if catalog is None:
        _say("perf_analyzer: skipped -- no --catalog given to build input data from.")
        return {"tritonserver": version or ""}, []
    missing = sorted(set(wanted.values()) - set(ready))
    if missing:
        _say(f"perf_analyzer: not ready on the server, skipped: {', '.join(missing)}")
    exe = perf_sweep.find_perf_analyzer(setup=True)
    settings = sweep_settings(args, plan)
    perf_dir = out / "perf"
    host = url.rsplit(":", 1)[0]
    metrics_url = args.metrics_url or metrics_url or f"{host}:8002/metrics"
    jobs: list[tuple[str, Path | None, perf_sweep.SweepSettings]] = []
    for kind, model in wanted.items():
        if model in ready:
            jobs.append((model, None, settings))
    member_settings = settings if args.concurrency else replace(settings, concurrency=plan.member_concurrency)
    for model, path in members.items():
        if model in ready:
            jobs.append((model, path, member_settings))
    failed: list[str] = []
    kinds = {model: kind for kind, model in wanted.items()}
    for model, data, level_settings in jobs:
        _say(f"perf_analyzer: {model} at concurrency {list(level_settings.concurrency)}")
        try:
            if data is None:
                data = input_data.write_input_data(perf_dir / "input" / f"{kinds[model]}.json", catalog,
                                                   kinds[model])
            result = perf_sweep.run_sweep(model, url, data, perf_dir, settings=level_settings,
                                          perf_analyzer=exe, metrics_url=metrics_url)
        except XmsearchError as e:  # one model's failure must not cost the others' numbers
            print(f"perf_analyzer: {model} failed: {e}", file=sys.stderr)
            failed.append(model)
            continue
        for row in result.rows:
            _say(f"  c={row.concurrency:<3} {row.throughput:8.1f} infer/s  p50 {row.p50_us / 1000:7.2f} ms"
                 f"  p99 {row.p99_us / 1000:7.2f} ms")
        if result.skipped:
            _say(f"  no stable measurement at concurrency {result.skipped}")
    return {"tritonserver": version or "", "perf_analyzer": perf_sweep.perf_analyzer_version(exe)}, failed


# --- FAISS -----------------------------------------------------------------------------------

def run_faiss(args: argparse.Namespace, plan: Plan, out: Path) -> None:
    """Run the FAISS benchmark and save faiss.json with the command that reproduces it."""
    result = faiss_bench.run_faiss_bench(
        sizes=plan.faiss_sizes, quick=args.quick,
        on_row=lambda r: _say(f"  faiss {r.n:>9,} {r.label:<28} recall@10={r.recall_at_10:.3f} "
                              f"qps={r.qps:,.0f} 1-query qps={r.single_query_qps:,.0f}"))
    sizes = ["--sizes", ",".join(str(n) for n in plan.faiss_sizes)] if plan.faiss_sizes else []
    result.command = shlex.join(["python", "-m", "benchmarks.faiss_bench", *(["--quick"] if args.quick else []),
                                 *sizes, "--out", _rel(out)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "faiss.json").write_text(result.to_json())
    _say(faiss_bench.describe_default(result))
    _say(faiss_bench.describe_single_default(result))


# --- the served stack, end to end and baselines ------------------------------------------------

def _queries(catalog_dir: Path) -> tuple[list[str], list[bytes]]:
    from benchmarks.e2e import load_queries

    queries = catalog_dir / "queries.jsonl"
    if queries.is_file():
        texts, images = load_queries(queries, "text"), load_queries(queries, "image")
        if texts and images:
            return texts, images
    # A user catalogue without a query log: titles and photos stand in for queries.
    records = input_data.load_records(catalog_dir, "item")
    texts = [r.text for r in records if r.text][:100]
    images = [r.image.read_bytes() for r in records if r.image is not None][:100]
    return texts, images


def run_stack(args: argparse.Namespace, plan: Plan, out: Path, command: str) -> tuple[dict[str, str], list[str]]:
    """Everything that needs a server: sweeps, client e2e, baselines, ratios, text-model comparison."""
    from benchmarks import baselines, compare, e2e, stack, text_ratio
    from benchmarks.loadgen import LoadResult

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.url is not None:
        _, _, reason = _server_state(args.url, [])
        if reason:  # say so before generating or exporting anything
            _say(f"perf_analyzer: skipped -- {reason}. Start the server first or pass --url.")
            _say("end to end and baselines: skipped -- they need the same server.")
            return {}, []
    if args.catalog is not None:
        catalog_dir = args.catalog if args.catalog.is_dir() else args.catalog.parent
    else:
        catalogue = stack.demo_catalogue(plan.catalogue_items, plan.catalogue_queries)
        catalog_dir = catalogue.root
        _say(f"catalogue: {plan.catalogue_items} demo items, {plan.catalogue_queries} queries in {_rel(catalog_dir)}")
    run_e2e = args.only in (None, "e2e")
    if run_e2e and args.catalog is None and plan.ingest_items:
        ingest_file = stack.demo_catalogue(plan.ingest_items, 0).catalog_file
        _say(f"ingest catalogue: {plan.ingest_items} demo items in {_rel(ingest_file.parent)}")
    elif run_e2e:
        ingest_file = input_data.resolve_source(catalog_dir, "item")
    run_sweeps = args.only in (None, "perf") and not args.skip_perf_analyzer
    repository = None
    if args.url is None or (run_e2e and args.repository is None):
        repository = stack.exported_repository(args.text_model, args.fusion, step=lambda m: log.info("%s", m))
        _say(f"repository: {_rel(repository.path)} ({args.text_model}, "
             f"{'trained' if repository.trained else 'untrained'} fusion, fingerprint {repository.fingerprint})")
    repo_path = args.repository or (repository.path if repository else None)
    timings["catalogue + export"] = time.perf_counter() - t0

    texts, images = _queries(catalog_dir)
    perf_dir = out / "perf"
    member_inputs: dict[str, Path] = {}
    if run_sweeps:
        shutil.rmtree(perf_dir, ignore_errors=True)  # a re-measurement replaces the old sweeps whole
        if repo_path is not None:
            member_inputs = baselines.write_member_inputs(repo_path, plan.members, texts, images,
                                                          perf_dir / "input")

    versions: dict[str, str] = {}
    failed: list[str] = []
    served: list[LoadResult] = []
    ingest = None
    ingests: list = []
    alternated: dict[str, list[float]] = {}
    index_dir = stack.CACHE_DIR / "bench-index"
    server = None if args.url else stack.PrivateServer(repository.path, log_file=stack.CACHE_DIR / "tritonserver.log")
    try:
        if server is not None:
            t = time.perf_counter()
            server.__enter__()
            _say(f"tritonserver: ready at {server.url} in {time.perf_counter() - t:.0f} s")
        url = server.url if server else args.url
        metrics_url = server.metrics_url if server else None
        if run_sweeps:
            t = time.perf_counter()
            versions, failed = run_perf(args, plan, url, catalog_dir, out, member_inputs, metrics_url)
            timings["perf_analyzer sweeps"] = time.perf_counter() - t
        if run_e2e:
            t = time.perf_counter()
            for _ in range(plan.ingest_rounds):
                ingests.append(e2e.measure_ingest(ingest_file, index_dir, url,
                                                  server_pid=server.server.pid if server else None))
                _say(f"ingest: {ingests[-1].items} items in {ingests[-1].seconds:.1f} s = "
                     f"{ingests[-1].items_per_second:.1f} items/s")
            ingest = e2e.median_ingest(ingests)
            served = e2e.measure_search(index_dir, url, texts, images,
                                        e2e.SearchPlan(duration_s=plan.search_duration_s,
                                                       warmup_s=plan.search_warmup_s),
                                        on_result=lambda r: _say(_load_line("client", r)))
            timings["client end to end"] = time.perf_counter() - t
            if repo_path is not None and plan.ratio_rounds:
                t = time.perf_counter()
                alternated = text_ratio.run(index_dir, url, repo_path, texts, plan.ratio_rounds, plan.ratio_seconds,
                                            16, plan.baseline_batches, log=_say)
                timings["text ratio, alternated"] = time.perf_counter() - t
    finally:
        if server is not None:
            server.__exit__(None, None, None)

    torch_rows: list[LoadResult] = []
    onnx_rows: list[LoadResult] = []
    if run_e2e:
        from xmsearch.client.index import CatalogIndex

        t = time.perf_counter()
        index = CatalogIndex.open(index_dir, read_only=True)
        # The same top-10 as Searcher: photo queries ranked again by the photo-side vectors.
        search = lambda vectors: index.search(vectors, 10)  # noqa: E731
        search_photo = lambda vectors: index.search_photo(vectors, 10)  # noqa: E731
        bplan = baselines.BaselinePlan(duration_s=plan.baseline_duration_s, warmup_s=plan.search_warmup_s,
                                       batch_sizes=plan.baseline_batches)
        try:
            torch_base = baselines.TorchBaseline(args.text_model, args.fusion)
            torch_rows = baselines.measure(torch_base, texts, images, search, bplan,
                                           on_result=lambda r: _say(_load_line("pytorch", r)),
                                           search_photo=search_photo)
            del torch_base
            onnx_rows = baselines.measure(baselines.OnnxBaseline(repo_path), texts, images, search, bplan,
                                          on_result=lambda r: _say(_load_line("onnxruntime", r)),
                                          search_photo=search_photo)
        finally:
            index.close()
        timings["in-process baselines"] = time.perf_counter() - t

    e5_rows: list[tuple[str, int, float, float, float]] = []
    if run_sweeps and args.url is None and plan.e5_concurrency and not args.skip_text_model_comparison:
        t = time.perf_counter()
        e5_rows = compare_text_models(args, plan, out, catalog_dir)
        timings["text model comparison"] = time.perf_counter() - t

    (out / "e2e.json").write_text(json.dumps({
        "ingest": ingest.__dict__ if ingest else None, "ingest_rounds": [i.__dict__ for i in ingests],
        "served": [r.to_dict() for r in served],
        "pytorch": [r.to_dict() for r in torch_rows], "onnxruntime": [r.to_dict() for r in onnx_rows],
        "text_ratio_alternated": alternated,
        "text_models": e5_rows, "timings_s": {k: round(v, 1) for k, v in timings.items()}}, indent=2))
    if run_e2e:
        _write_sections(out, command, plan, served, torch_rows, onnx_rows, ingests, repository, args, alternated)
    if e5_rows:
        notes = (f"perf_analyzer on `query_text`, same settings as the sweeps above, each model served alone by "
                 f"a private tritonserver (cpu target, {'trained' if args.fusion else 'untrained'} fusion). "
                 "MiniLM-L6 rows come from the main sweep of this run.")
        report.write_section_file(out, "text_models", compare.text_model_section(e5_rows, notes, [command]))
    for name, seconds in timings.items():
        _say(f"time: {name} {seconds:.0f} s")
    return versions, failed


def compare_text_models(args: argparse.Namespace, plan: Plan, out: Path, catalog_dir: Path
                        ) -> list[tuple[str, int, float, float, float]]:
    """query_text served with MiniLM-L6 (this run's sweep) and with multilingual-e5-small-q4."""
    from benchmarks import stack

    rows: list[tuple[str, int, float, float, float]] = []
    minilm = out / "perf" / f"{spec.QUERY_TEXT}.json"
    if minilm.is_file():
        sweep = perf_sweep.SweepResult.from_json(minilm.read_text())
        rows += [(args.text_model, r.concurrency, r.throughput, r.p50_us / 1000, r.p99_us / 1000)
                 for r in sweep.rows if r.concurrency in plan.e5_concurrency]
    if args.text_model == E5_MODEL:
        return rows
    _say(f"text model comparison: exporting {E5_MODEL}")
    repository = stack.exported_repository(E5_MODEL, None, step=lambda m: log.info("%s", m))
    settings = replace(sweep_settings(args, plan), concurrency=plan.e5_concurrency)
    data = input_data.write_input_data(out / "perf-e5" / "input" / "text.json", catalog_dir, "text")
    with stack.PrivateServer(repository.path, log_file=stack.CACHE_DIR / "tritonserver-e5.log") as server:
        try:
            result = perf_sweep.run_sweep(spec.QUERY_TEXT, server.url, data, out / "perf-e5", settings=settings)
        except XmsearchError as e:
            print(f"text model comparison: {E5_MODEL} sweep failed: {e}", file=sys.stderr)
            return rows
    for r in result.rows:
        _say(f"  {E5_MODEL} c={r.concurrency:<3} {r.throughput:8.1f} infer/s  p50 {r.p50_us / 1000:7.2f} ms")
        rows.append((E5_MODEL, r.concurrency, r.throughput, r.p50_us / 1000, r.p99_us / 1000))
    return rows


def _load_line(who: str, r) -> str:
    return (f"  {who:<12} {r.label:<16} threads={r.concurrency:<3} batch={r.batch:<3} {r.qps:8.1f} q/s  "
            f"p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms")


def _write_sections(out: Path, command: str, plan: Plan, served, torch_rows, onnx_rows, ingests, repository,
                    args: argparse.Namespace, alternated: dict[str, list[float]] | None = None) -> None:
    from benchmarks import compare, e2e, text_ratio

    ingest = e2e.median_ingest(ingests)
    sweeps = report.load_sweeps(out)
    weights = ("trained fusion weights from `--fusion`" if args.fusion else
               "untrained (seeded) fusion weights: serving speed does not depend on the weight values")
    ingested = (f"; the ingest, {plan.ingest_items} more generated items"
                if plan.ingest_items and not args.catalog else "")
    common = (f"Demo catalogue ({_rel(args.catalog) if args.catalog else f'{plan.catalogue_items} generated items'}"
              f"{ingested}), "
              f"text model {args.text_model}, {weights}. Every query ends in the same FAISS Flat top-10 search of "
              f"the index built by the ingest (a photo query: the first 50, ranked again by the items' photo-side "
              f"vectors, `CatalogIndex.search_photo`, served and in process alike). Threads share one client (one gRPC channel), as a web front end "
              f"would. {plan.search_duration_s:g} s measured per point after {plan.search_warmup_s:g} s of warm-up; "
              f"load average (1/5/15 min) at the end of the run: {_load()}.")
    rounds = len(alternated[text_ratio.TOGETHER]) if alternated else 0
    items = compare.ratios(served, torch_rows, onnx_rows, sweeps, ingest.items_per_second if ingest else None,
                           text_alternated=(*text_ratio.medians(alternated, plan.baseline_batches), rounds)
                           if rounds else None)
    notes = ("Served = Triton through the xmsearch client (or perf_analyzer where marked); baselines run in this "
             "process on the same queries, after the server was stopped. *met* / *NOT met* is a plain comparison "
             "of the measured ratio with the issue's bound; nothing was tuned to pass.")
    if rounds:
        notes += ("\n\nThe row marked *alternated* measures the same two things again while the server is up, in "
                  f"{rounds} round{'s' if rounds != 1 else ''} that alternate them ({plan.ratio_seconds:g} s per row "
                  "and round, every other round in reverse order; `benchmarks.text_ratio`), so that a change of the "
                  "machine's load between "
                  "the two measurements above does not land in the ratio; its figures are medians over the rounds:"
                  "\n\n" + text_ratio.summarise(alternated, plan.baseline_batches))
    report.write_section_file(out, "targets", compare.ratio_section(items, notes, [command]))
    report.write_section_file(out, "e2e", compare.e2e_section(
        served, ingest.items if ingest else None, ingest.seconds if ingest else None, common, [command],
        ingest_rounds=[i.items_per_second for i in ingests], ingest_cpu_ms=ingest.cpu_ms if ingest else None,
        image_encoder_best=compare.best_throughput(sweeps, spec.IMAGE_ENCODER)))
    batches = " or ".join(str(b) for b in plan.baseline_batches)
    base_notes = (f"One query at a time = one call per query on one thread; batched = one call per batch of {batches} "
                  "queries (queries/s counts queries). PyTorch uses torch's default intra-op threads, ONNX Runtime "
                  "its default (all cores), as the served members use 2 threads each on this target.")
    report.write_section_file(out, "baselines", compare.baseline_section(torch_rows, onnx_rows, base_notes,
                                                                         [command]))
    for r in items:
        _say(f"target: {r.name}: {'-' if r.value is None else f'{r.value:.2f}x'} (target {r.target}) -> {r.verdict()}")


# --- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short run (under 3 minutes): query_text, query_image and image_encoder at "
                             "concurrency 1 and 16 (image_encoder 16) with 1 s windows, 100-item catalogue, "
                             "FAISS at 20k vectors, no text-model comparison")
    parser.add_argument("--url", help="measure this running Triton gRPC endpoint instead of starting a private "
                                      "server (HOST:PORT)")
    parser.add_argument("--catalog", type=Path,
                        help="catalogue folder (catalog.jsonl, optional queries.jsonl); default: a generated "
                             "demo catalogue cached in benchmarks/.cache")
    parser.add_argument("--fusion", type=Path, help="trained fusion checkpoint to export (default: untrained)")
    parser.add_argument("--untrained", action="store_true",
                        help="export untrained fusion weights (the default without --fusion; speed does not "
                             "depend on the weights)")
    parser.add_argument("--text-model", default=spec.DEFAULT_TEXT_MODEL,
                        help="text model of the exported repository (default %(default)s)")
    parser.add_argument("--repository", type=Path,
                        help="with --url: the served model repository, for the ONNX Runtime baseline "
                             "(default: export one)")
    parser.add_argument("--concurrency", type=int, nargs="+",
                        help="perf_analyzer concurrency levels (default 1 2 4 8 16 32 64, members 1 4 16 64; "
                             "QUICK 1 16, members 16)")
    parser.add_argument("--measurement-interval", type=int, metavar="MS",
                        help="perf_analyzer time window per trial (default 1500; QUICK 1000)")
    parser.add_argument("--stability-percentage", type=float, metavar="PCT",
                        help="allowed spread of the last 3 windows (default 30; QUICK 50)")
    parser.add_argument("--collect-metrics", action="store_true",
                        help="add perf_analyzer's GPU metric columns (GPU servers only; empty on CPU)")
    parser.add_argument("--metrics-url", help="Triton metrics URL for --collect-metrics (default HOST:8002/metrics)")
    parser.add_argument("--out", type=Path,
                        help="results and report folder (default benchmarks/results; QUICK benchmarks/results/quick)")
    parser.add_argument("--models", nargs="+", choices=list(spec.ENSEMBLES),
                        help="ensembles to sweep (default: all four; QUICK query_text and query_image)")
    parser.add_argument("--skip-perf-analyzer", action="store_true", help="do not run perf_analyzer sweeps")
    parser.add_argument("--skip-faiss", action="store_true", help="do not run the FAISS benchmark")
    parser.add_argument("--skip-text-model-comparison", action="store_true",
                        help=f"do not serve {E5_MODEL} next to the main text model")
    parser.add_argument("--only", choices=["faiss", "perf", "e2e"], help="run only this benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.fusion is not None and args.untrained:
        print("error: pass either --fusion CKPT or --untrained, not both", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    out: Path = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    started, load_before = time.perf_counter(), _load()
    versions_path = out / "versions.json"
    versions = json.loads(versions_path.read_text()) if versions_path.is_file() else {}
    failed: list[str] = []
    try:
        if args.only != "faiss":
            measured, failed = run_stack(args, plan, out, command)
            versions.update({k: v for k, v in measured.items() if v})
            versions_path.write_text(json.dumps(versions, indent=2))
        if args.only in (None, "faiss") and not args.skip_faiss:
            t = time.perf_counter()
            run_faiss(args, plan, out)
            _say(f"time: FAISS {time.perf_counter() - t:.0f} s")
        path = report.build_report(out)
    except XmsearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - started
    with open(out / "commands.txt", "a", encoding="utf-8") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {command}  # {wall:.0f} s, load before {load_before}, "
                 f"after {_load()}, {os.cpu_count()} cores\n")
    _say(f"report: {path} (whole run {wall:.0f} s)")
    if failed:
        print(f"error: perf_analyzer failed for {', '.join(failed)} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
