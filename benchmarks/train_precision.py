"""Training speed of the fusion module in fp32 and with bfloat16 autocast, side by side.

Both runs train on the same cached frozen-encoder features (the ones ``xmsearch train`` /
``make demo`` cached next to the checkpoint) with the same settings and seed; they alternate
round by round so that a noisy machine slows both alike.  Reported: seconds per epoch (the
first epoch has no look-alike batches and is left out), the ratio, and the loss of the last
epoch, which should agree to a few parts in a thousand.

    .venv/bin/python -m benchmarks.train_precision --catalog demo --epochs 3 --rounds 2 \\
        --out benchmarks/results/train_precision.md

Retrieval quality of the two precisions over whole trainings is ``benchmarks.quality_ab``'s
job (``--variant fp32:precision='fp32' --variant bf16:precision='bf16'``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks import publish
from xmsearch.models.image import DEFAULT_IMAGE_MODEL
from xmsearch.train import Features, TrainConfig, cached_features, features_path, train_fusion

PRECISIONS = ("fp32", "bf16")


def epoch_seconds(history: list[dict]) -> list[float]:
    """Durations of epochs 2.. from the cumulative ``seconds`` of a training history."""
    stamps = [h["seconds"] for h in history]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def measure(f: Features, epochs: int, rounds: int, seed: int = 0, log=print) -> dict[str, dict]:
    """Train ``rounds`` times per precision, alternating; per precision the epoch times and last losses."""
    if epochs < 2:
        raise ValueError("epochs must be >= 2 (the first epoch is left out of the timing)")
    out = {p: {"epoch_s": [], "loss": []} for p in PRECISIONS}
    for r in range(rounds):
        for p in PRECISIONS:
            hist = train_fusion(f, "-", "-", TrainConfig(epochs=epochs, seed=seed, precision=p)).history
            seconds = epoch_seconds(hist)
            out[p]["epoch_s"] += seconds
            out[p]["loss"].append(hist[-1]["loss"])
            log(f"round {r + 1} {p}: {statistics.median(seconds):.2f} s/epoch, "
                f"last loss {hist[-1]['loss']:.4f}")
    return out


def table(results: dict[str, dict]) -> str:
    base = statistics.median(results["fp32"]["epoch_s"])
    lines = ["| precision | s/epoch (median) | epochs timed | speed vs fp32 | last-epoch loss |",
             "|---|---:|---:|---:|---:|"]
    for p, r in results.items():
        med = statistics.median(r["epoch_s"])
        lines.append(f"| {p} | {med:.2f} | {len(r['epoch_s'])} | {base / med:.2f}x | "
                     + " / ".join(f"{x:.4f}" for x in r["loss"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--catalog", type=Path, required=True, help="dir with catalog.jsonl (features cached)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per training (>= 2; default 3)")
    p.add_argument("--rounds", type=int, default=2, help="trainings per precision, alternated (default 2)")
    p.add_argument("--text-model", default="multilingual-e5-small-q4")
    p.add_argument("--image-model", default=DEFAULT_IMAGE_MODEL)
    p.add_argument("--cache-dir", type=Path, help="feature cache (default CATALOG/.feature-cache)")
    p.add_argument("--out", type=Path, help="also write the table (markdown, with this command) here")
    a = p.parse_args(argv)
    path = features_path(a.catalog / "catalog.jsonl", a.text_model, a.image_model, 0,
                         a.cache_dir or a.catalog / ".feature-cache")
    f = cached_features(path)
    if f is None:
        p.error(f"no cached features at {path}: run `xmsearch train` (or `make demo`) on that catalogue first")
    cpu = torch.backends.cpu.get_cpu_capability()
    text = (f"{len(f.ids)} items, {torch.get_num_threads()} threads, CPU capability {cpu}\n\n"
            + table(measure(f, a.epochs, a.rounds)))
    publish(text, a.out, "benchmarks.train_precision", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
