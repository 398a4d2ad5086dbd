"""Catalogue ingest throughput by request shape, side by side on one server.

Every variant ingests the same demo catalogue into a fresh Flat index through
``xmsearch.client.ingest.ingest_catalog``, with its own rows per request and requests in
flight (``ROWSxIN_FLIGHT``); rounds alternate the order (forward, then reversed) and the
median items/s is reported with its range, its ratio to the first variant, and the CPU the
server's process tree and this client spent per item.  ``--baseline-rev REV`` puts the
ingest of an earlier commit first (its ``client/ingest.py``, loaded from git, with the
request shape it used), so a change to the ingest loop is measured against the code it
replaced.

    .venv/bin/python -m benchmarks.ingest_stream --items 1800 --rounds 4 --baseline-rev 0e40f2b \\
        --variant 8x8 --variant 8x4 --variant 4x8 --variant 16x4 --variant 8x16 \\
        --out benchmarks/results/ingest_stream.md

A variant ``ROWSxIN_FLIGHTvN`` also averages N re-shots of each photo into its photo-side
vector (``photo_views``), and one ending in ``t`` mixes each item's other titles into its
vector (``alt_titles``); their cost is measured the same way:

    .venv/bin/python -m benchmarks.ingest_stream --items 1500 --rounds 2 --text-model multilingual-e5-small-q4 \\
        --variant 8x4 --variant 8x4v3 --out benchmarks/results/ingest_photo_views.md
    .venv/bin/python -m benchmarks.ingest_stream --items 1500 --rounds 2 --text-model multilingual-e5-small-q4 \\
        --variant 8x4 --variant 8x4t --out benchmarks/results/ingest_alt_titles.md
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import publish

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variant:
    name: str
    ingest: Callable  # (catalog, index_dir, embedder) -> IngestReport


def parse_shape(text: str) -> tuple[int, int, int, bool]:
    """``"8x16"`` -> (8 rows per request, 16 requests in flight, 0 photo views, no other titles);
    ``"8x4v3"`` -> (8, 4, 3, False): each item's photo-side vector also averages 3 re-shots
    (``photo_views``); ``"8x4t"`` -> (8, 4, 0, True): the other titles go into each item's
    vector (``alt_titles``)."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:v(\d+))?(t)?", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected ROWSxIN_FLIGHT[vVIEWS][t], "
                                         "e.g. 8x16, 8x4v3 or 8x4t")
    rows, in_flight, views = int(m[1]), int(m[2]), int(m[3] or 0)
    if rows < 1 or in_flight < 1:
        raise argparse.ArgumentTypeError(f"variant {text!r}: both numbers must be at least 1")
    return rows, in_flight, views, m[4] is not None


def shape_variant(rows: int, in_flight: int, chunk_size: int, photo_views: int = 0,
                  alt_titles: bool = False) -> Variant:
    from xmsearch.client.ingest import ingest_catalog

    name = f"{rows}x{in_flight}" + (f"v{photo_views}" if photo_views else "") + ("t" if alt_titles else "")
    return Variant(name, lambda cat, out, emb: ingest_catalog(
        cat, out, emb, chunk_size=chunk_size, request_rows=rows, in_flight=in_flight, photo_views=photo_views,
        alt_titles=alt_titles))


def baseline_variant(rev: str, chunk_size: int, workdir: Path) -> Variant:
    """The ingest loop of commit ``rev``, loaded from git into its own module."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout.strip()
        source = subprocess.run(["git", "show", f"{rev}:client/ingest.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--baseline-rev {rev}: {exc.stderr.strip() or exc}") from None
    path = workdir / f"ingest_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"ingest_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return Variant(f"{commit}", lambda cat, out, emb: module.ingest_catalog(cat, out, emb, chunk_size=chunk_size))


def measure(variants: list[Variant], catalog_file: Path, url: str, server_pid: int | None, rounds: int,
            log: Callable[[str], None] = print) -> dict[str, dict[str, list[float]]]:
    """Per variant, one figure per round of: ``items/s``, ``server CPU ms/item`` (the process
    tree of ``server_pid``; left out without one) and ``client CPU ms/item``."""
    from benchmarks import proc_cpu
    from xmsearch.client.embed import Embedder

    figures: dict[str, dict[str, list[float]]] = {v.name: {} for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "index"
        for r in range(rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                shutil.rmtree(index_dir, ignore_errors=True)
                embedder = Embedder(url)
                try:
                    before = proc_cpu.tree_cpu_seconds(server_pid) if server_pid else {}
                    c0 = time.process_time()
                    report = v.ingest(Path(catalog_file), index_dir, embedder)
                    client_s = time.process_time() - c0
                    after = proc_cpu.tree_cpu_seconds(server_pid) if server_pid else {}
                finally:
                    embedder.close()
                items = max(report.added, 1)
                got = figures[v.name]
                got.setdefault("items/s", []).append(report.items_per_second)
                if server_pid:
                    got.setdefault("server CPU ms/item", []).append(
                        sum(proc_cpu.cpu_per_item(before, after, items).values()))
                got.setdefault("client CPU ms/item", []).append(client_s * 1e3 / items)
                log(f"round {r + 1}/{rounds} {v.name}: {report.items_per_second:.1f} items/s")
    return figures


def table(figures: dict[str, dict[str, list[float]]]) -> str:
    """Markdown: per variant the median items/s (min-max), its ratio to the first variant,
    and the median CPU figures."""
    names = list(figures)
    extra = [k for k in figures[names[0]] if k != "items/s"]
    base = statistics.median(figures[names[0]]["items/s"])
    lines = ["| variant | items/s median (min-max) | ratio | " + " | ".join(extra) + " |",
             "|---|---:|---:|" + "---:|" * len(extra)]
    for name in names:
        xs = figures[name]["items/s"]
        m = statistics.median(xs)
        cells = [f"{statistics.median(figures[name][k]):.1f}" for k in extra]
        lines.append(f"| {name} | {m:.1f} ({min(xs):.1f}-{max(xs):.1f}) | {m / base:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(variants: list[Variant], items: int, rounds: int, text_model: str) -> str:
    from benchmarks import stack
    from xmsearch.client.embed import Embedder

    catalogue = stack.demo_catalogue(items, 30)
    repository = stack.exported_repository(text_model)
    with stack.PrivateServer(repository.path) as server:
        warm = Embedder(server.url)
        try:  # the first requests after a start are slower: not part of any variant
            photo = next((catalogue.root / "images").iterdir()).read_bytes()
            warm.embed_items(["warm-up"] * 8, [photo] * 8)
        finally:
            warm.close()
        figures = measure(variants, catalogue.catalog_file, server.url, server.server.pid, rounds)
    return (f"Ingest of {items} demo items ({text_model}, {repository.path.name}, Flat index), {rounds} "
            f"alternated rounds on one tritonserver, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            "CPU from /proc: the server's process tree and this client.\n\n" + table(figures))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--items", type=int, default=1800, help="demo catalogue size (default: 1800)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=256, help="rows per index chunk (default: 256)")
    p.add_argument("--variant", action="append", type=parse_shape, dest="shapes", metavar="ROWSxIN_FLIGHT[vVIEWS][t]",
                   help="request shape of the current ingest, photo views per item after a v, and a t "
                        "for the other titles (repeat; default: 8x4, ingest_catalog's)")
    p.add_argument("--baseline-rev", metavar="REV", help="also run the ingest of this git commit, first")
    p.add_argument("--text-model", default="minilm-l6")
    p.add_argument("--out", type=Path, help="also write the result here, under the command")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        variants = [baseline_variant(a.baseline_rev, a.chunk_size, Path(tmp))] if a.baseline_rev else []
        variants += [shape_variant(r, f, a.chunk_size, v, t) for r, f, v, t in (a.shapes or [(8, 4, 0, False)])]
        publish(run(variants, a.items, a.rounds, a.text_model), a.out, "benchmarks.ingest_stream", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
