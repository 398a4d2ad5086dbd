"""Photo -> pixels: the lookup-table normalisation against the per-pixel arithmetic it replaced.

``ImagePreprocessor.pixels`` (used by the served ``image_preprocess`` / ``item_preprocess``
models, the in-process pipeline and training's feature cache) resizes a decoded photo, crops
it and normalises it to float32 ``(v / 255 - mean) / std``.  The arithmetic took three passes
over the 224x224x3 floats plus a transposing copy; a per-channel table of the 256 possible
values gives the same bits with one gather.  This times both over a catalogue's photos,
rounds alternated, and checks that every output is bit-identical.

    .venv/bin/python -m benchmarks.image_normalise --catalog benchmarks/.cache/catalog-n1200-q0-s0 \\
        --out benchmarks/results/image_normalise.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import publish
from benchmarks.loadgen import ratio_table


def arithmetic_pixels(pre, img):
    """The per-pixel normalisation ``ImagePreprocessor.pixels`` used before the table."""
    import numpy as np

    img = pre.cropped(img)
    mean = np.asarray(pre.config.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.config.std, dtype=np.float32).reshape(3, 1, 1)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - mean) / std


def run(photos: list[Path], rounds: int) -> str:
    import numpy as np

    from xmsearch.preprocess import ImagePreprocessConfig, ImagePreprocessor, decode_image

    pre = ImagePreprocessor(ImagePreprocessConfig())
    images = [decode_image(p.read_bytes(), what=str(p)) for p in photos]
    same = all(np.array_equal(arithmetic_pixels(pre, im), pre.pixels(im)) for im in images)
    variants = {"arithmetic": lambda im: arithmetic_pixels(pre, im), "lookup table": pre.pixels}
    ms: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            fn = variants[name]
            t0 = time.perf_counter()
            for im in images:
                fn(im)
            ms[name].append((time.perf_counter() - t0) * 1e3 / len(images))
    return (f"{len(images)} decoded catalogue photos ({images[0].size[0]}x{images[0].size[1]} px) to "
            f"{pre.config.size}x{pre.config.size} float32 pixels, one thread, {rounds} alternated rounds; "
            f"outputs bit-identical: {'yes' if same else 'NO'}.\n\n" + ratio_table("pixels()", "ms per photo", ms))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--catalog", type=Path, required=True, help="catalogue folder with an images/ folder")
    p.add_argument("--photos", type=int, default=300, help="photos to use (default: 300)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", type=Path, help="also write the result here, under the command")
    a = p.parse_args(argv)
    photos = sorted((a.catalog / "images").glob("*.jpg"))[: a.photos]
    if not photos:
        p.error(f"--catalog {a.catalog}: no images/*.jpg there (make one with `xmsearch demo-catalog`)")
    publish(run(photos, a.rounds), a.out, "benchmarks.image_normalise", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
