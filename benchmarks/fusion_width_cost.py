"""What a wider fusion module costs the served fusion graphs (ONNX Runtime, side by side).

``TrainConfig.width`` sets the width of the fusion module's tokens, attention and head.
This builds the module at two widths with the trained layout (seeded weights: the cost does
not depend on their values), exports the graphs that every ingested item (``fusion_item``)
and every text or photo query (``fusion_text``, ``fusion_image``) runs, and times them in
ONNX Runtime as the cpu target serves them (2 threads, idle threads not spinning), rounds
alternated, at batch 1 and 8.

    .venv/bin/python -m benchmarks.fusion_width_cost --widths 256 384 \\
        --out benchmarks/results/fusion_width_cost.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

from benchmarks import publish
from benchmarks.loadgen import ab_table, alternated_ms_per_call

GRAPHS = {"fusion_item": "item", "fusion_text": "text", "fusion_image": "image"}


def run(widths: Sequence[int], rounds: int, seconds: float, batches: Sequence[int] = (1, 8),
        tokens: int = 16, regions: int = 49, text_dim: int = 384, image_dim: int = 1800) -> str:
    import torch

    from xmsearch import spec as S
    from xmsearch.export.onnx import export_onnx, onnx_session
    from xmsearch.models.fusion import AttentionFusion, FusionEntry
    from xmsearch.train import TrainConfig

    base = TrainConfig()
    specs = S.member_specs(S.Dims(text_dim=text_dim, image_dim=image_dim, embed_dim=base.embed_dim, regions=regions))
    gen = torch.Generator().manual_seed(0)
    inputs = {"text": lambda b: (torch.randn(b, tokens, text_dim, generator=gen),
                                 torch.ones(b, tokens, dtype=torch.int64)),
              "image": lambda b: (torch.randn(b, regions, image_dim, generator=gen),)}
    inputs["item"] = lambda b: inputs["text"](b) + inputs["image"](b)
    variants = [f"width {w}" for w in widths]
    sessions: dict[tuple[str, str], object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w, name in zip(widths, variants):
            torch.manual_seed(0)
            fusion = AttentionFusion(text_dim, image_dim, width=w, embed_dim=base.embed_dim,
                                     image_reduce_dim=base.image_reduce_dim, query_cross=base.query_cross,
                                     item_mix=base.item_mix).eval()
            for graph, kind in GRAPHS.items():
                path = export_onnx(FusionEntry(fusion, kind), specs[graph], inputs[kind](2),
                                   Path(tmp) / f"{graph}-{w}.onnx")
                sessions[(name, graph)] = onnx_session(path, threads=2, spinning=False)
    points: dict[tuple[str, str], list[float]] = {}
    for graph, kind in GRAPHS.items():
        names = [t.name for t in specs[graph].inputs]
        for b in batches:
            feed = dict(zip(names, (t.numpy() for t in inputs[kind](b))))
            timed = alternated_ms_per_call(
                {name: (lambda s=sessions[(name, graph)]: s.run(None, feed)) for name in variants}, rounds, seconds)
            points.update({(name, f"{graph}, ms per call, batch {b}"): ms for name, ms in timed.items()})
    return (f"Medians over {rounds} alternated rounds (min-max), {seconds:g} s each, {tokens} title tokens, "
            f"{regions} regions, seeded weights, the training defaults otherwise.\n\n"
            + ab_table(points, *variants))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--widths", type=int, nargs=2, default=[256, 384], metavar=("BEFORE", "AFTER"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per variant and round")
    p.add_argument("--out", type=Path, help="also write the table here, under the command")
    a = p.parse_args(argv)
    publish(run(a.widths, a.rounds, a.seconds), a.out, "benchmarks.fusion_width_cost", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
