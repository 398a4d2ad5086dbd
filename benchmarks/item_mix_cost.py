"""What the stored-item mix costs the ``fusion_item`` graph (ONNX Runtime, side by side).

``AttentionFusion.item`` adds an item's title-only and photo-only embeddings to its joint
one (``item_mix``): two more pooling passes in the graph the ``item`` ensemble runs for
every ingested item.  This exports that graph twice from one set of weights, with
``item_mix`` 0 and the trained default, and times both in ONNX Runtime (2 threads, idle
threads not spinning, as the cpu target serves them), rounds alternated, at batch 1 and 8.

    .venv/bin/python -m benchmarks.item_mix_cost --checkpoint demo/fusion-multilingual-e5-small-q4.pt \\
        --out benchmarks/results/item_mix_cost.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

from benchmarks import publish
from benchmarks.loadgen import ab_table, alternated_ms_per_call


def run(checkpoint: Path | None, mix: float, rounds: int, seconds: float, batches: Sequence[int] = (1, 8),
        tokens: int = 16, regions: int = 49) -> str:
    import torch

    from xmsearch import spec as S
    from xmsearch.checkpoint import FusionCheckpoint
    from xmsearch.export.onnx import export_onnx, onnx_session
    from xmsearch.models.fusion import AttentionFusion, FusionEntry

    if checkpoint is not None:
        fusion = FusionCheckpoint.load(checkpoint).fusion
    else:  # the trained layout with seeded weights: the cost does not depend on their values
        torch.manual_seed(0)
        fusion = AttentionFusion(384, 1800, query_cross=True)
    cfg = fusion.eval().config()
    spec = S.member_specs(S.Dims(text_dim=cfg["text_dim"], image_dim=cfg["image_dim"],
                                 embed_dim=cfg["embed_dim"], regions=regions))[S.FUSION_ITEM]
    gen = torch.Generator().manual_seed(0)

    def example(b: int) -> tuple:
        return (torch.randn(b, tokens, cfg["text_dim"], generator=gen), torch.ones(b, tokens, dtype=torch.int64),
                torch.randn(b, regions, cfg["image_dim"], generator=gen))

    variants = {"item_mix 0": 0.0, f"item_mix {mix:g}": mix}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, value in variants.items():
            fusion.item_mix = value
            path = export_onnx(FusionEntry(fusion, "item"), spec, example(2), Path(tmp) / f"{value}.onnx")
            sessions[name] = onnx_session(path, threads=2, spinning=False)
    names = [t.name for t in spec.inputs]
    points: dict[tuple[str, str], list[float]] = {}
    for b in batches:
        feed = dict(zip(names, (t.numpy() for t in example(b))))
        timed = alternated_ms_per_call({name: (lambda s=sess: s.run(None, feed)) for name, sess in sessions.items()},
                                       rounds, seconds)
        points.update({(name, f"ms per call, batch {b}"): ms for name, ms in timed.items()})
    return (f"Medians over {rounds} alternated rounds (min-max), {seconds:g} s each, {tokens} title tokens, "
            f"{regions} regions, weights {'of ' + str(checkpoint) if checkpoint else 'seeded (untrained)'}.\n\n"
            + ab_table(points, *variants))


def main(argv: list[str] | None = None) -> int:
    from xmsearch.train import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", type=Path, help="fusion checkpoint (default: seeded weights, e5/MiniLM sizes)")
    p.add_argument("--mix", type=float, default=TrainConfig.item_mix,
                   help=f"the mix compared with 0 (default: the training default, {TrainConfig.item_mix:g})")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per variant and round")
    p.add_argument("--out", type=Path, help="also write the table here, under the command")
    a = p.parse_args(argv)
    publish(run(a.checkpoint, a.mix, a.rounds, a.seconds), a.out, "benchmarks.item_mix_cost", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
