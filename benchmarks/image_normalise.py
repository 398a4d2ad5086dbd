"""Photo -> pixels: uint8 pixels (normalised inside the image encoder) against float32 ones.

``ImagePreprocessor.pixels`` (used by the served ``image_preprocess`` / ``item_preprocess``
models, the in-process pipeline and training's feature cache) resizes a decoded photo, crops it
and hands over its 8-bit RGB values as a [3, size, size] uint8 tensor; the image encoder's graph
applies ``(v / 255 - mean) / std`` as its first step (``ImageEncoder.normalise``).  Until then
the preprocessing normalised to float32 itself, through a per-channel lookup table of the 256
possible values (which had replaced three passes of per-pixel arithmetic).  This times both
over a catalogue's photos, rounds alternated, and checks that the encoder's multiply-add gives
the table's values to float32 rounding.

    .venv/bin/python -m benchmarks.image_normalise --catalog benchmarks/.cache/catalog-n1200-q0-s0 \\
        --out benchmarks/results/image_normalise.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import publish
from benchmarks.loadgen import ratio_table


class TablePixels:
    """The float32 pixels ``ImagePreprocessor.pixels`` returned before uint8: a per-channel
    lookup table of ``(v / 255 - mean) / std`` gathered into a [3, size, size] array."""

    def __init__(self, pre):
        import numpy as np

        self.pre = pre
        mean = np.asarray(pre.config.mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(pre.config.std, dtype=np.float32).reshape(3, 1)
        self.lut = ((np.arange(256, dtype=np.float32)[None, :] / 255.0 - mean) / std).astype(np.float32)

    def __call__(self, img):
        import numpy as np

        size = self.pre.config.size
        rgb = np.asarray(self.pre.cropped(img).convert("RGB"))
        out = np.empty((3, size, size), np.float32)
        for c in range(3):
            np.take(self.lut[c], rgb[..., c], out=out[c])
        return out


def run(photos: list[Path], rounds: int) -> str:
    import numpy as np

    from xmsearch.preprocess import ImagePreprocessConfig, ImagePreprocessor, decode_image

    pre = ImagePreprocessor(ImagePreprocessConfig())
    table = TablePixels(pre)
    images = [decode_image(p.read_bytes(), what=str(p)) for p in photos]
    scale, shift = pre.config.affine()
    worst = max(float(np.abs(pre.pixels(im) * scale[:, None, None] + shift[:, None, None] - table(im)).max())
                for im in images)
    variants = {"float32, lookup table": table, "uint8": pre.pixels}
    ms: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            fn = variants[name]
            t0 = time.perf_counter()
            for im in images:
                fn(im)
            ms[name].append((time.perf_counter() - t0) * 1e3 / len(images))
    return (f"{len(images)} decoded catalogue photos ({images[0].size[0]}x{images[0].size[1]} px) to "
            f"{pre.config.size}x{pre.config.size} pixels, one thread, {rounds} alternated rounds; the image "
            f"encoder's multiply-add on the uint8 pixels against the table: max |difference| {worst:.1e}.\n\n"
            + ratio_table("pixels()", "ms per photo", ms))


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
