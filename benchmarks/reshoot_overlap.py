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

import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks import catalogue_parser, parse_catalogue_args, publish
from benchmarks.loadgen import alternated_figures, ratio_table
from xmsearch.catalog import read_catalog
from xmsearch.models.image import DEFAULT_IMAGE_MODEL
from xmsearch.pipeline import Encoders
from xmsearch.train import AUG_VIEWS, chunk_regions, photo_chunks, photo_features, reshoots

PLAIN, OVERLAPPED = "plain loop (before)", "re-shots on a worker thread"


def plain_loop(enc: Encoders, rows, rng: random.Random, batch: int = 64) -> torch.Tensor:
    """The loop ``photo_features`` replaced: each chunk's re-shots, then its encoding."""
    return torch.cat([chunk_regions(enc, reshoots(chunk, rng), len(chunk)) for chunk in photo_chunks(rows, batch)])


def run(catalog: Path, items: int, rounds: int, log=print) -> tuple[dict[str, list[float]], bool]:
    """ms per catalogue item of each variant, one figure per round, and whether every round's
    regions were equal between the two."""
    rows, _ = read_catalog(catalog / "catalog.jsonl")
    rows = rows[:items]
    enc = Encoders.load(image_model=DEFAULT_IMAGE_MODEL)
    regions: dict[str, torch.Tensor] = {}
    same = []

    def timed(name: str, variant) -> Callable[[], float]:
        def measure() -> float:
            # Each round draws its re-shots from its own seed, the same for both variants.
            t = time.perf_counter()
            regions[name] = variant(enc, rows, random.Random(len(same)))
            return (time.perf_counter() - t) / len(rows) * 1e3
        return measure

    def compared(rnd: int, ms: dict[str, list[float]]) -> None:
        same.append(torch.equal(regions[PLAIN], regions[OVERLAPPED]))
        log(f"round {rnd + 1}/{rounds}: " + ", ".join(f"{n} {ms[n][-1]:.1f} ms/item" for n in ms))

    with tempfile.TemporaryDirectory() as tmp:
        enc.use_onnx_images(Path(tmp))
        plain_loop(enc, rows[:8], random.Random(0))  # warm-up: the first ONNX Runtime runs are slow
        ms = alternated_figures({PLAIN: timed(PLAIN, plain_loop), OVERLAPPED: timed(OVERLAPPED, photo_features)},
                                rounds, on_round=compared)
    return ms, all(same)


def main(argv: list[str] | None = None) -> int:
    p = catalogue_parser(__doc__, seconds=False, rounds=4, photos=256)
    a = parse_catalogue_args(p, argv)
    ms, same = run(a.catalog, a.items, a.rounds)
    text = (f"{a.items} catalogue photos of {a.catalog} and {AUG_VIEWS} re-shots of each, image encoder "
            f"{DEFAULT_IMAGE_MODEL} through ONNX Runtime, {a.rounds} alternated rounds; ms per catalogue item "
            f"(its photo and re-shots drawn and encoded).\n\n{ratio_table('variant', 'ms per item', ms, 1)}\n\n"
            f"Regions of the two variants {'identical' if same else 'DIFFERENT'} in every round.")
    publish(text, a.out, "benchmarks.reshoot_overlap", argv)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
