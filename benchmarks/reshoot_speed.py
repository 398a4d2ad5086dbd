"""Time the re-shot renderer (:func:`xmsearch.reshoot.augment_photo`) against its version at
a git revision, on a catalogue's photos, and check that both render the same bytes.

Training renders ``AUG_VIEWS`` re-shots of every catalogue photo for its features, and
``xmsearch index --photo-views N`` N more per item on the client; a change meant only to
render them faster must not change a byte of them (the cached features, the stored vectors
and every quality figure measured with them stay valid).  Rounds are alternated; each round
renders one re-shot of every photo with both versions from the same seed.

    .venv/bin/python -m benchmarks.reshoot_speed --catalog demo --baseline e3c3fcd --out benchmarks/results/reshoot_speed.md
"""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from benchmarks import catalogue_parser, parse_catalogue_args, publish
from benchmarks.loadgen import alternated_figures, ratio_table
from xmsearch import reshoot
from xmsearch.catalog import read_catalog

REPO = Path(__file__).resolve().parents[1]


def module_at(revision: str, folder: Path):
    """``xmsearch/reshoot.py`` as it was at ``revision``, imported under another name."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:xmsearch/reshoot.py"],
                                check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"--baseline {revision}: cannot read xmsearch/reshoot.py there ({e})")
    path = folder / "reshoot_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("reshoot_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(photos: list[bytes], baseline, rounds: int, log=print) -> tuple[dict[str, list[float]], bool]:
    """ms per re-shot of each version, one figure per round, and whether every re-shot of
    every round was byte-identical between them."""
    rendered: dict[str, list[bytes]] = {}
    same: list[bool] = []
    versions = {"baseline revision": baseline.augment_photo, "this tree": reshoot.augment_photo}

    def timed(name: str, render: Callable) -> Callable[[], float]:
        def measure() -> float:
            rng = random.Random(len(same))  # the same draws for both versions in a round
            t = time.perf_counter()
            rendered[name] = [render(p, rng) for p in photos]
            return (time.perf_counter() - t) / len(photos) * 1e3
        return measure

    def compared(rnd: int, ms: dict[str, list[float]]) -> None:
        a, b = rendered.values()
        same.append(a == b)
        log(f"round {rnd + 1}/{rounds}: " + ", ".join(f"{n} {ms[n][-1]:.2f} ms" for n in ms)
            + ("" if same[-1] else "  (DIFFERENT bytes)"))

    return alternated_figures({n: timed(n, f) for n, f in versions.items()}, rounds, on_round=compared), all(same)


def main(argv: list[str] | None = None) -> int:
    p = catalogue_parser(__doc__, seconds=False, rounds=6, photos=256)
    p.add_argument("--baseline", required=True, help="git revision whose xmsearch/reshoot.py to compare with")
    a = parse_catalogue_args(p, argv)
    rows, _ = read_catalog(a.catalog / "catalog.jsonl")
    rows = [r for r in rows if r.image is not None and r.image.is_file()][: a.items]
    if not rows:
        p.error(f"--catalog {a.catalog}: no item has a photo file")
    photos = [r.image.read_bytes() for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        ms, same = run(photos, module_at(a.baseline, Path(tmp)), a.rounds)
    size = "x".join(str(v) for v in reshoot.Image.open(rows[0].image).size)
    text = (f"One re-shot of each of the first {len(photos)} photos of {a.catalog} ({size}), {a.rounds} "
            f"alternated rounds, one thread; ms per re-shot, `augment_photo` at {a.baseline} against this "
            f"tree.\n\n{ratio_table('version', 'ms per re-shot', ms, 2)}\n\n"
            f"Re-shots of the two versions {'byte-identical' if same else 'DIFFERENT'} in every round.")
    publish(text, a.out, "benchmarks.reshoot_speed", argv)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
