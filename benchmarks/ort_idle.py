"""One call after an idle gap: a member graph's latency per ONNX Runtime thread setting.

At concurrency 1 a served member is idle between requests, so what its first call after a
pause costs is what the client sees.  This times one row of a member of an exported
repository in process, with a pause of ``--gap-ms`` before every call, under three
settings, rounds alternated: two intra-op threads whose idle time is spent spinning (ONNX
Runtime's default, what the in-process baseline (c) of ``benchmarks.run`` uses), two
threads that sleep when idle (what the cpu target serves, chosen for throughput under
load: ``serving_ab.md``), two that spin inside a run and sleep once it returns
(``xmsearch export --ort-spinning run``), and one thread.  A second table gives the
process's CPU time per call, its idle pause included: what spinning costs the other
members that share the cores.

    .venv/bin/python -m benchmarks.ort_idle --repository benchmarks/.cache/repository-minilm-l6 \\
        --out benchmarks/results/ort_idle.md
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from benchmarks import publish
from benchmarks.loadgen import alternated_median_ms, ratio_table

# name, intra-op threads, spinning, spinning stops when a run returns
SETTINGS = (("2 threads, spinning", 2, True, False), ("2 threads, not spinning", 2, False, False),
            ("2 threads, spinning inside a run only", 2, True, True), ("1 thread", 1, False, False))


def _one_row(member: str, repository: Path) -> dict:
    """A real input row for ``member`` (the text encoder: one short query, tokenized as served)."""
    import numpy as np

    from xmsearch import spec as S
    from xmsearch.preprocess import TextPreprocessor

    if member != S.TEXT_ENCODER:
        raise SystemExit(f"--member {member}: only {S.TEXT_ENCODER} is timed here")
    pre = TextPreprocessor.from_dir(S.query_tokenizer_folder(repository))
    ids, mask = pre.encode(["blue down jacket"], "query")
    return {S.INPUT_IDS: np.asarray(ids), S.ATTENTION_MASK: np.asarray(mask)}


def run(repository: Path, member: str, gap_ms: float, rounds: int, calls: int) -> str:
    from xmsearch.export.onnx import onnx_session

    graph = repository / member / "1" / "model.onnx"
    if not graph.is_file():
        raise SystemExit(f"{graph} does not exist: export a cpu repository first (make bench does)")
    row = _one_row(member, repository)
    sessions = {name: onnx_session(graph, threads, spinning=spin, spin_stop=stop)
                for name, threads, spin, stop in SETTINGS}
    cpu_ms: dict[str, list[float]] = {}
    ms = alternated_median_ms({name: functools.partial(sess.run, None, row) for name, sess in sessions.items()},
                              rounds, calls, gap_ms, cpu_ms)
    return (f"`{member}` of {repository.name} ({graph.stat().st_size / 1e6:.0f} MB graph), one row, "
            f"{gap_ms:g} ms idle before each call, {calls} calls per round, {rounds} alternated rounds; "
            "the rounds' medians.\n\n" + ratio_table("setting", "ms per call", ms)
            + "\n\nCPU time of the process per call, its idle pause included (all threads):\n\n"
            + ratio_table("setting", "CPU ms per call", cpu_ms))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--repository", type=Path, required=True, help="an exported cpu repository")
    p.add_argument("--member", default="text_encoder")
    p.add_argument("--gap-ms", type=float, default=2.0, help="idle pause before each call (default: 2)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=200, help="timed calls per setting and round")
    p.add_argument("--out", type=Path, help="also write the result here, under the command")
    a = p.parse_args(argv)
    publish(run(a.repository, a.member, a.gap_ms, a.rounds, a.calls), a.out, "benchmarks.ort_idle", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
