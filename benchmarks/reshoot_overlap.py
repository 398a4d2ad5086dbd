"""Photo features for training with the re-shots drawn on a worker thread, against a plain loop.

:func:`xmsearch.train.photo_features` encodes every catalogue photo and ``AUG_VIEWS``
re-shots of it (the largest part of ``xmsearch train``'s feature pass after the text
encoder); it draws the next chunk's re-shots on one worker thread while the image encoder
runs.  This times it against the plain loop it replaced (re-shots, then the encoder, chunk
after chunk, on one thread), rounds alternated, on the first ``--items`` photos of a
catalogue, and checks that both give the same regions.

    .venv/bin/python -m benchmarks.reshoot_overlap --catalog demo --out benchmarks/results/reshoot_overlap.md
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import publish
from benchmarks.loadgen import ratio_table
from xmsearch.catalog import read_catalog
from xmsearch.models.image import DEFAULT_IMAGE_MODEL
from xmsearch.pipeline import Encoders
from xmsearch.train import AUG_VIEWS, augment_photo, photo_features

PLAIN, OVERLAPPED = "plain loop (before)", "re-shots on a worker thread"


def plain_loop(enc: Encoders, rows, rng: random.Random, batch: int = 64) -> torch.Tensor:
    """The loop ``photo_features`` replaced: each chunk's re-shots, then its encoding."""
    n, step = len(rows), max(1, batch // (1 + AUG_VIEWS))
    regions = []
    for i in range(0, n, step):
        chunk = rows[i:i + step]
        photos = [r.image.read_bytes() for r in chunk]
        shots = photos + [augment_photo(p, rng) for _ in range(AUG_VIEWS) for p in photos]
        r = enc.image_regions(shots)
        regions.append(r.view(1 + AUG_VIEWS, len(chunk), *r.shape[1:]).transpose(0, 1).half())
    return torch.cat(regions)


def run(catalog: Path, items: int, rounds: int, log=print) -> tuple[dict[str, list[float]], bool]:
    """ms per catalogue item of each variant, one figure per round, and whether every round's
    regions were equal between the two."""
    rows, _ = read_catalog(catalog / "catalog.jsonl")
    rows = rows[:items]
    enc = Encoders.load(image_model=DEFAULT_IMAGE_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        enc.use_onnx_images(Path(tmp))
        variants = {PLAIN: plain_loop, OVERLAPPED: photo_features}
        ms: dict[str, list[float]] = {name: [] for name in variants}
        same = True
        plain_loop(enc, rows[:8], random.Random(0))  # warm-up: the first ONNX Runtime runs are slow
        for rnd in range(rounds):
            out = {}
            for name in (list(variants) if rnd % 2 == 0 else list(variants)[::-1]):
                t = time.perf_counter()
                out[name] = variants[name](enc, rows, random.Random(rnd))
                ms[name].append((time.perf_counter() - t) / len(rows) * 1e3)
            same = same and torch.equal(out[PLAIN], out[OVERLAPPED])
            log(f"round {rnd + 1}/{rounds}: " + ", ".join(f"{n} {ms[n][-1]:.1f} ms/item" for n in variants))
    return ms, same


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--catalog", type=Path, default=Path("demo"),
                   help="catalogue folder with catalog.jsonl (default: demo)")
    p.add_argument("--items", type=int, default=256, help="catalogue photos per round (default: 256)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, help="also write the result here, under the command")
    a = p.parse_args(argv)
    if not (a.catalog / "catalog.jsonl").is_file():
        p.error(f"--catalog {a.catalog}: no catalog.jsonl there (make one with `xmsearch demo-catalog`)")
    if a.items < 1 or a.rounds < 1:
        p.error("--items and --rounds must be >= 1")
    ms, same = run(a.catalog, a.items, a.rounds)
    text = (f"{a.items} catalogue photos of {a.catalog} and {AUG_VIEWS} re-shots of each, image encoder "
            f"{DEFAULT_IMAGE_MODEL} through ONNX Runtime, {a.rounds} alternated rounds; ms per catalogue item "
            f"(its photo and re-shots drawn and encoded).\n\n{ratio_table('variant', 'ms per item', ms, 1)}\n\n"
            f"Regions of the two variants {'identical' if same else 'DIFFERENT'} in every round.")
    publish(text, a.out, "benchmarks.reshoot_overlap", argv)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
