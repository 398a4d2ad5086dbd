"""Side-by-side serving speed of model-config variants of one exported repository.

Each variant is a copy of the cached cpu-target repository (``benchmarks.stack``) with some
member settings overridden; all variants are served at once by private tritonservers and
measured in alternating order each round, so machine noise hits them alike.  Per round and
variant: perf_analyzer on ``query_text`` and ``query_image`` at concurrency 1 (p50) and 16
(infer/s), the client's catalogue ingest (items/s; with the CPU milliseconds per item of the
server and of its main members, Linux), and then the memory the server and its stubs hold
(PSS, Linux).  Prints the median of each figure over the rounds and its ratio to
the first variant.

    .venv/bin/python -m benchmarks.serving_ab --variant now: \\
        --variant nospin:spin=0 --variant nodelay:delay=0 --rounds 3 \\
        --out benchmarks/results/serving_ab.md

A variant is ``NAME:KEY=VALUE,...`` (``NAME:`` alone serves the repository as exported).
KEY is ``FIELD`` (every member the field applies to) or ``MEMBER.FIELD``; FIELDs:

* ``delay``: dynamic batcher ``max_queue_delay_microseconds``;
* ``preferred``: preferred batch sizes, ``/``-separated (``8/16``; empty for none);
* ``instances``: instance count;
* ``threads``: ONNX Runtime intra-op threads (members that run ONNX Runtime);
* ``spin``: ONNX Runtime idle-thread spinning, 0 or 1 (same members);
* ``spin_stop``: ONNX Runtime ``session.force_spinning_stop``, 0 or 1: with ``spin=1``, the
  threads spin inside a run only and sleep once it returns (same members);
* ``spin_rows``: ``spin_max_rows``, batches of at most this many rows run in a second session
  that spins inside its runs (``xmsearch export --ort-spinning single`` is 1; same members);
* ``spin_threads``: ``spin_intra_op_threads``, that second session's ONNX Runtime threads (0: the
  member's ``threads``; same members);
* ``run_rows``: ``max_rows_per_run``, larger merged batches run as several runs of at most this
  many rows (0: one run; same members);
* ``text_precision``: the text encoder graph, ``fp32`` or ``int8`` (``xmsearch export
  --text-precision``; no MEMBER: the variant starts from a repository exported so);
* ``fusion_precision``: the four fusion graphs, likewise (``xmsearch export --fusion-precision``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from benchmarks import input_data, perf_sweep, proc_cpu, publish, stack
from benchmarks.e2e import measure_ingest
from xmsearch import spec
from xmsearch.errors import ConfigError
from xmsearch.export.repository import read_repository, write_config

ORT_FIELDS = {"threads": "intra_op_threads", "spin": "allow_spinning", "spin_stop": "force_spinning_stop",
              "spin_rows": "spin_max_rows", "spin_threads": "spin_intra_op_threads",
              "run_rows": "max_rows_per_run"}
# Chosen at export, not in a member config.
EXPORT_FIELDS = {"text_precision": ("fp32", "int8"), "fusion_precision": ("fp32", "int8")}
FIELDS = ("delay", "preferred", "instances", *ORT_FIELDS, *EXPORT_FIELDS)
KINDS = ("text", "image")
LEVELS = (1, 16)
MEMBERS = (spec.TEXT_ENCODER, spec.IMAGE_ENCODER, spec.FUSION_JOINT)  # baselines.member_input_rows
# CPU ms per ingested item reported by serving_ab and source_ab: the server's total and its main members.
INGEST_CPU_ROWS = ("total", spec.IMAGE_ENCODER, spec.TEXT_ENCODER, spec.FUSION_ITEM, spec.ITEM_PREPROCESS)
MEMBER_LEVELS = (16, 64)  # --member: the member's best infer/s over these, as make bench sweeps it


@dataclass(frozen=True)
class Override:
    member: str | None  # None: every member the field applies to
    field: str
    value: str


@dataclass
class Variant:
    name: str
    overrides: list[Override]
    figures: dict[str, list[float]] = field(default_factory=dict)


def parse_variant(spec: str) -> Variant:
    """``"lean:delay=0,text_encoder.threads=1"`` -> a Variant with two overrides."""
    name, _, rest = spec.partition(":")
    if not name:
        raise ConfigError(f"variant {spec!r}: give it a name, as NAME:KEY=VALUE,...")
    overrides = []
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        member, _, fld = key.rpartition(".")
        if not eq or fld not in FIELDS:
            raise ConfigError(f"variant {spec!r}: {item!r} is not [MEMBER.]FIELD=VALUE with FIELD one of "
                              f"{', '.join(FIELDS)}")
        if fld in EXPORT_FIELDS and (member or value not in EXPORT_FIELDS[fld]):
            raise ConfigError(f"variant {spec!r}: {item!r}: {fld} takes no MEMBER and one of "
                              f"{', '.join(EXPORT_FIELDS[fld])}")
        overrides.append(Override(member or None, fld, value))
    return Variant(name, overrides)


def export_choices(v: Variant) -> dict[str, str]:
    """The variant's export-time choices, as keyword arguments of ``stack.exported_repository``."""
    return {o.field: o.value for o in v.overrides if o.field in EXPORT_FIELDS}


def _int(o: Override) -> int:
    try:
        return int(o.value)
    except ValueError:
        raise ConfigError(f"{o.field}={o.value!r}: expected an integer") from None


def _apply(cfg, o: Override) -> bool:
    """Apply ``o`` to one member config; False when the field does not apply to it."""
    if o.field in ORT_FIELDS:
        key = ORT_FIELDS[o.field]
        if "intra_op_threads" not in cfg.parameters:  # not an ONNX Runtime member
            return False
        if o.field in ("spin", "spin_stop") and o.value not in ("0", "1"):
            raise ConfigError(f"{o.field}={o.value!r}: expected 0 or 1")
        cfg.parameters[key].string_value = str(_int(o))
        return True
    if not cfg.HasField("dynamic_batching"):
        return False
    if o.field == "delay":
        cfg.dynamic_batching.max_queue_delay_microseconds = _int(o)
    elif o.field == "preferred":
        sizes = [int(s) for s in filter(None, o.value.split("/"))]
        del cfg.dynamic_batching.preferred_batch_size[:]
        cfg.dynamic_batching.preferred_batch_size.extend(sizes)
    elif o.field == "instances":
        cfg.instance_group[0].count = _int(o)
    return True


def make_variant(repository: Path, out: Path, overrides: list[Override]) -> None:
    """Copy ``repository`` to ``out`` with ``overrides`` applied to its member configs."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(repository, out)
    configs = read_repository(out)
    for o in (o for o in overrides if o.field not in EXPORT_FIELDS):
        targets = [o.member] if o.member else [n for n, c in configs.items() if c.platform != "ensemble"]
        if o.member and o.member not in configs:
            raise ConfigError(f"{o.member}.{o.field}: no member {o.member!r} in the repository "
                              f"(members: {', '.join(sorted(configs))})")
        applied = [n for n in targets if _apply(configs[n], o)]
        if not applied:
            raise ConfigError(f"{o.field}={o.value}: applies to none of {', '.join(targets)}")
        for n in applied:
            write_config(configs[n], out / n)


def measure_queries(v: Variant, url: str, inputs: dict[str, Path], work: Path,
                    settings: perf_sweep.SweepSettings) -> None:
    """perf_analyzer on the query ensemble of each kind in ``inputs`` (kind -> input data file):
    p50 at concurrency 1 and infer/s at 16 into ``v``."""
    for kind in inputs:
        model = input_data.KIND_MODEL[kind]
        result = perf_sweep.run_sweep(model, url, inputs[kind], work / "perf" / v.name, settings)
        by_level = {r.concurrency: r for r in result.rows}
        if 1 in by_level:
            v.figures.setdefault(f"{model} p50 ms c=1", []).append(by_level[1].p50_us / 1000)
        if 16 in by_level:
            v.figures.setdefault(f"{model} infer/s c=16", []).append(by_level[16].throughput)


def _measure(v: Variant, server: stack.PrivateServer, inputs: dict[str, Path], catalog_file: Path, work: Path,
             settings: perf_sweep.SweepSettings, members: dict[str, Path] | None = None) -> None:
    url = server.url
    measure_queries(v, url, inputs, work, settings)
    best = {}
    member_settings = replace(settings, concurrency=MEMBER_LEVELS)
    for member, data in (members or {}).items():
        result = perf_sweep.run_sweep(member, url, data, work / "perf" / v.name, member_settings)
        best[member] = max(r.throughput for r in result.rows)
        v.figures.setdefault(f"{member} best infer/s", []).append(best[member])
    ingest = measure_ingest(catalog_file, work / f"index-{v.name}", url, server_pid=server.server.pid)
    record_ingest(v, ingest)
    for member, rate in best.items():  # issue #6's ingest ratio is against the image encoder's
        v.figures.setdefault(f"ingest / {member} best (x100)", []).append(100 * ingest.items_per_second / rate)
    if megabytes := proc_cpu.tree_pss_mb(server.server.pid):  # 0 where /proc is not readable
        v.figures.setdefault("server memory MB (PSS)", []).append(megabytes)


def record_ingest(v: Variant, ingest) -> None:
    """An ingest's items/s and CPU ms per item (``INGEST_CPU_ROWS``: the server's total, without
    the client, and its main members; from ``/proc``) into ``v``'s figures."""
    v.figures.setdefault("ingest items/s", []).append(ingest.items_per_second)
    cpu = dict(ingest.cpu_ms, total=sum(ms for k, ms in ingest.cpu_ms.items() if k != "client"))
    for row in INGEST_CPU_ROWS:
        if row in cpu:
            v.figures.setdefault(f"ingest CPU ms/item: {row}", []).append(cpu[row])


def member_inputs(repository: Path, queries_file: Path, names: list[str], work: Path) -> dict[str, Path]:
    """perf_analyzer input files of real rows for the members ``names``, as ``make bench`` writes them."""
    if not names:
        return {}
    from benchmarks.baselines import write_member_inputs
    from benchmarks.e2e import load_queries

    return write_member_inputs(repository, names, load_queries(queries_file, "text"),
                               load_queries(queries_file, "image"), work)


def alternate_rounds(variants: list[Variant], rounds: int, measure: Callable[[Variant], None]) -> None:
    """``rounds`` rounds of ``measure(v)`` over ``variants``, every other round in reverse order
    (so neither side always goes first), printing each variant's latest figures as it goes."""
    for rnd in range(rounds):
        for v in variants if rnd % 2 == 0 else variants[::-1]:
            measure(v)
            print(f"round {rnd} {v.name}: " + ", ".join(f"{k} {vals[-1]:.2f}" for k, vals in v.figures.items()),
                  flush=True)


def table(variants: list[Variant]) -> str:
    """Median (min-max) of each figure per variant, and its ratio to the first variant."""
    base = variants[0]
    lines = ["| figure | " + " | ".join(v.name for v in variants) + " |",
             "|---|" + "---:|" * len(variants)]
    for fig in base.figures:
        cells = []
        for v in variants:
            vals = v.figures.get(fig, [])
            if not vals:
                cells.append("-")
                continue
            med = statistics.median(vals)
            cell = f"{med:.1f} ({min(vals):.1f}-{max(vals):.1f})"
            if v is not base and base.figures.get(fig):
                cell += f" **{med / statistics.median(base.figures[fig]):.2f}x**"
            cells.append(cell)
        lines.append(f"| {fig} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_text(described: str, variants: list[Variant], rounds: int, served: str, n_items: int, t0: float,
                text_model: str | None = None) -> str:
    """The closing report of an A/B run (``serving_ab``, ``source_ab``): what each side is, the
    table, how it was measured and how long it took since ``t0`` (``time.perf_counter``)."""
    setup = f"{n_items}-item demo catalogue, " + (f"{text_model}, " if text_model else "") + "untrained fusion"
    return (f"{described}\n\n{table(variants)}\n\nMedian (min-max) over {rounds} rounds, {served} served at once "
            f"and measured in alternating order; {setup}; {time.perf_counter() - t0:.0f} s.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...",
                   help="a variant (repeat; the first is the reference of the ratios)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per variant (default 3)")
    p.add_argument("--items", type=int, default=300, help="demo catalogue size (default 300)")
    p.add_argument("--interval-ms", type=int, default=2000, help="perf_analyzer window (default 2000)")
    p.add_argument("--member", action="append", default=[], choices=MEMBERS,
                   help="also the member's best perf_analyzer infer/s (concurrency 16 and 64, real "
                        "inputs) and the ingest's ratio to it (repeat)")
    p.add_argument("--work", type=Path, help="folder for repositories, indexes and raw output "
                                             "(default: a temporary folder)")
    p.add_argument("--out", type=Path, help="also write the table (with this command) to this file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        variants = [parse_variant(s) for s in a.variant]
    except ConfigError as e:
        p.error(str(e))
    if len({v.name for v in variants}) != len(variants):
        p.error("variant names must differ")
    work = a.work or Path(tempfile.mkdtemp(prefix="xmsearch-serving-ab-"))
    cat = stack.demo_catalogue(a.items, max(30, a.items // 3))
    repos = {v.name: stack.exported_repository(step=lambda m: print(m, flush=True), **export_choices(v))
             for v in variants}
    inputs = {k: input_data.write_input_data(work / f"{k}.json", cat.queries_file, k) for k in KINDS}
    members = member_inputs(repos[variants[0].name].path, cat.queries_file, a.member, work)
    settings = perf_sweep.SweepSettings(concurrency=LEVELS, measurement_interval_ms=a.interval_ms,
                                        stability_percentage=30.0, max_trials=5)
    t0 = time.perf_counter()
    with ExitStack() as servers:
        served = {}
        for v in variants:
            path = work / f"repo-{v.name}"
            make_variant(repos[v.name].path, path, v.overrides)
            served[v.name] = servers.enter_context(stack.PrivateServer(path, log_file=work / f"{v.name}.log"))
        alternate_rounds(variants, a.rounds, lambda v: _measure(v, served[v.name], inputs, cat.catalog_file, work,
                                                                settings, members))
    described = "\n".join(f"- `{v.name}`: " + (", ".join(f"{o.member + '.' if o.member else ''}{o.field}={o.value}"
                                                         for o in v.overrides) or "as exported")
                          for v in variants)
    publish(report_text(described, variants, a.rounds, "variants", cat.n_items, t0), a.out,
            "benchmarks.serving_ab", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
