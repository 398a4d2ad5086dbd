"""What caching training features costs per catalogue photo, and PyTorch vs ONNX Runtime.

``xmsearch train`` encodes every catalogue photo and ``AUG_VIEWS`` re-shots of it once
(:func:`xmsearch.train.compute_features`).  This times each step on the same photos, in
one process: the re-shot augmentation, decoding + preprocessing, and the frozen image
encoder through PyTorch eager and through ONNX Runtime (the graph
:meth:`xmsearch.pipeline.Encoders.use_onnx_images` exports and parity-checks), the two
runtimes alternated round by round so that a change in the machine's load hits both.

    .venv/bin/python -m benchmarks.feature_encoding --catalog demo --out benchmarks/results/feature_encoding.txt
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import publish
from xmsearch.catalog import read_catalog
from xmsearch.export.onnx import onnx_session
from xmsearch.models.image import DEFAULT_IMAGE_MODEL
from xmsearch.pipeline import Encoders
from xmsearch.reshoot import augment_photo


def per_image_ms(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) / n * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", type=Path, required=True, help="dir with catalog.jsonl (e.g. the demo's)")
    p.add_argument("--images", type=int, default=64, help="photos per round, encoded as one batch (default 64)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image-model", default=DEFAULT_IMAGE_MODEL)
    p.add_argument("--out", type=Path, help="also write the table here")
    a = p.parse_args(argv)
    rows, _ = read_catalog(a.catalog / "catalog.jsonl")
    photos = [r.image.read_bytes() for r in rows[: a.images]]
    n = len(photos)
    enc = Encoders.load(image_model=a.image_model)
    with tempfile.TemporaryDirectory() as tmp:
        path = enc.use_onnx_images(Path(tmp))
        enc.image_session = None
        # The training session as built by use_onnx_images, except that its idle threads do
        # not spin: spinning ORT threads would steal the cores from the PyTorch round after.
        session = onnx_session(path, spinning=False)
        rng = random.Random(0)
        shots = [augment_photo(p, rng) for p in photos]
        px = np.stack([enc.image_pre(b) for b in shots])
        feed = {session.get_inputs()[0].name: px}
        with torch.no_grad():  # warm both runtimes up
            enc.image(torch.from_numpy(px[:8]))
        session.run(None, {session.get_inputs()[0].name: px[:8]})
        times: dict[str, list[float]] = {k: [] for k in ("augment (re-shot)", "decode + preprocess",
                                                         "encoder, PyTorch eager", "encoder, ONNX Runtime")}
        for r in range(a.rounds):
            times["augment (re-shot)"].append(per_image_ms(lambda: [augment_photo(p, rng) for p in photos], n))
            times["decode + preprocess"].append(per_image_ms(lambda: [enc.image_pre(b) for b in shots], n))
            pair = [("encoder, PyTorch eager", lambda: enc.image(torch.from_numpy(px))),
                    ("encoder, ONNX Runtime", lambda: session.run(None, feed))]
            for name, fn in (pair if r % 2 == 0 else pair[::-1]):
                with torch.no_grad():
                    times[name].append(per_image_ms(fn, n))
        with torch.no_grad():
            ref = enc.image(torch.from_numpy(px)).flatten(1)
        got = torch.from_numpy(session.run(None, feed)[0]).flatten(1)
        cos = torch.nn.functional.cosine_similarity(ref, got).min().item()
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"{a.image_model}, {n} demo photos per batch, {a.rounds} rounds, median ms per photo; "
             f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs", "",
             "| step | ms / photo | min-max |", "|---|---:|---:|"]
    lines += [f"| {k} | {med[k]:.1f} | {min(v):.1f}-{max(v):.1f} |" for k, v in times.items()]
    ratio = med["encoder, PyTorch eager"] / med["encoder, ONNX Runtime"]
    lines += ["", f"ONNX Runtime / PyTorch eager: {ratio:.2f}x the photos per second "
              f"(same process, alternated rounds); lowest cosine between the two outputs {cos:.6f}"]
    text = "\n".join(lines)
    publish(text, a.out, "benchmarks.feature_encoding", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
