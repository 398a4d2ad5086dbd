"""Run the benchmarks that can run here and write the report.

    python -m benchmarks.run [--quick] [--url localhost:8001] [--catalog DIR]
                             [--out benchmarks/results] [--skip-perf-analyzer] [--only faiss|perf]

* perf_analyzer sweeps of the served ensembles (needs a running tritonserver at --url
  and a catalogue for input data; each ensemble the server does not report ready is
  skipped with a message);
* the FAISS index benchmark (always possible);
* REPORT.md and plots under --out, from everything saved there (sections written by
  other benchmarks into <out>/sections/ are included).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks import faiss_bench, input_data, perf_sweep, report
from xmsearch import spec
from xmsearch.errors import XmsearchError

log = logging.getLogger("benchmarks.run")
REPO = Path(__file__).resolve().parents[1]


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


def run_perf(args: argparse.Namespace, out: Path) -> tuple[dict[str, str], list[str]]:
    """Sweep every ready ensemble; returns (versions measured, models whose sweep failed)."""
    wanted = {kind: model for kind, model in input_data.KIND_MODEL.items() if model in args.models}
    version, ready, reason = _server_state(args.url, list(wanted.values()))
    if reason:
        print(f"perf_analyzer: skipped -- {reason}. Start the server first or pass --url.")
        return {}, []
    if args.catalog is None:
        print("perf_analyzer: skipped -- no --catalog given to build input data from.")
        return {"tritonserver": version or ""}, []
    missing = sorted(set(wanted.values()) - set(ready))
    if missing:
        print(f"perf_analyzer: not ready on the server, skipped: {', '.join(missing)}")
    exe = perf_sweep.find_perf_analyzer(setup=True)
    settings = perf_sweep.QUICK_SETTINGS if args.quick else perf_sweep.SweepSettings()
    overrides = {"collect_metrics": args.collect_metrics or settings.collect_metrics}
    if args.measurement_interval:
        overrides["measurement_interval_ms"] = args.measurement_interval
    if args.stability_percentage:
        overrides["stability_percentage"] = args.stability_percentage
    if args.concurrency:
        overrides["concurrency"] = tuple(args.concurrency)
    settings = replace(settings, **overrides)
    perf_dir = out / "perf"
    shutil.rmtree(perf_dir, ignore_errors=True)  # a re-measurement replaces the old sweeps whole
    host = args.url.rsplit(":", 1)[0]
    metrics_url = args.metrics_url or f"{host}:8002/metrics"
    failed: list[str] = []
    for kind, model in wanted.items():
        if model not in ready:
            continue
        print(f"perf_analyzer: {model} at concurrency {list(settings.concurrency)}", flush=True)
        try:
            data = input_data.write_input_data(perf_dir / "input" / f"{kind}.json", args.catalog, kind)
            result = perf_sweep.run_sweep(model, args.url, data, perf_dir, settings=settings,
                                          perf_analyzer=exe, metrics_url=metrics_url)
        except XmsearchError as e:  # one model's failure must not cost the others' numbers
            print(f"perf_analyzer: {model} failed: {e}", file=sys.stderr)
            failed.append(model)
            continue
        for row in result.rows:
            print(f"  c={row.concurrency:<3} {row.throughput:8.1f} infer/s  p50 {row.p50_us / 1000:7.2f} ms"
                  f"  p99 {row.p99_us / 1000:7.2f} ms", flush=True)
    pa_version = perf_sweep.perf_analyzer_version(exe)
    return {"tritonserver": version or "", "perf_analyzer": pa_version}, failed


def run_faiss(args: argparse.Namespace, out: Path) -> None:
    """Run the FAISS benchmark and save faiss.json with the command that reproduces it."""
    result = faiss_bench.run_faiss_bench(
        quick=args.quick,
        on_row=lambda r: print(f"  faiss {r.n:>9,} {r.label:<28} recall@10={r.recall_at_10:.3f} "
                               f"qps={r.qps:,.0f}", flush=True))
    result.command = shlex.join(["python", "-m", "benchmarks.faiss_bench", *(["--quick"] if args.quick else []),
                                 "--out", _rel(out)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "faiss.json").write_text(result.to_json())
    print(faiss_bench.describe_default(result))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short runs: concurrency 1,4,16 with 1.5 s windows; FAISS at 100k only")
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint (default %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+",
                        help="concurrency levels (default 1 2 4 8 16 32 64; QUICK 1 4 16)")
    parser.add_argument("--measurement-interval", type=int, metavar="MS",
                        help="perf_analyzer time window per trial (default 3000; QUICK 1500)")
    parser.add_argument("--stability-percentage", type=float, metavar="PCT",
                        help="allowed spread of the last 3 windows (default 15; QUICK 30)")
    parser.add_argument("--collect-metrics", action="store_true",
                        help="add perf_analyzer's GPU metric columns (GPU servers only; empty on CPU)")
    parser.add_argument("--metrics-url", help="Triton metrics URL for --collect-metrics (default HOST:8002/metrics)")
    parser.add_argument("--catalog", type=Path,
                        help="catalogue or queries file/folder (catalog.jsonl, queries.jsonl) for input data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="results and report folder (default benchmarks/results)")
    parser.add_argument("--models", nargs="+", default=list(spec.ENSEMBLES), choices=list(spec.ENSEMBLES),
                        help="ensembles to sweep (default: all four)")
    parser.add_argument("--skip-perf-analyzer", action="store_true", help="do not run perf_analyzer sweeps")
    parser.add_argument("--only", choices=["faiss", "perf"], help="run only this benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    versions_path = out / "versions.json"
    versions = json.loads(versions_path.read_text()) if versions_path.is_file() else {}
    failed: list[str] = []
    try:
        if args.only != "faiss" and not args.skip_perf_analyzer:
            measured, failed = run_perf(args, out)
            versions.update({k: v for k, v in measured.items() if v})
            versions_path.write_text(json.dumps(versions, indent=2))
        if args.only != "perf":
            run_faiss(args, out)
        path = report.build_report(out)
    except XmsearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    if failed:
        print(f"error: perf_analyzer failed for {', '.join(failed)} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
