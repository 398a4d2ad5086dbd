"""The fusion module's attention pooling with its key and value projections folded, against
projecting every token (the module's first form), side by side.

The pooling's one learned query makes the per-token key and value projections unnecessary
(``xmsearch.models.fusion.PoolAttention``): same weights, same outputs to float rounding.
This measures what the fold saves where the module runs: the four exported fusion graphs in
ONNX Runtime (fp32 and the int8 rewrite of ``--fusion-precision int8``; 2 threads, idle
threads not spinning, as the cpu target runs them) on real inputs, token states of
catalogue titles and regions of catalogue photos, and one training step's forward and
backward passes (title+photo, title-only and photo-only embeddings of 128 items under the
training's autocast).  Rounds alternate the variants; the largest difference between the
two forms' outputs is printed beside.

    .venv/bin/python -m benchmarks.pool_fold --catalog demo \\
        --fusion demo/fusion-multilingual-e5-small-q4.pt --text-model multilingual-e5-small-q4 \\
        --out benchmarks/results/pool_fold.md
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks import catalogue_parser, parse_catalogue_args, publish
from benchmarks.fusion_int8 import _inputs, fusion_inputs
from benchmarks.loadgen import alternated_ms_per_call

BATCHES = (1, 16, 32)
FORMS = ("per-token", "folded")


def unfolded(fusion):
    """A copy of ``fusion`` whose pooling projects every token to a key and a value, as the
    module first did (``Attention.forward`` with the learned query broadcast over the batch)."""
    import torch

    from xmsearch.models.fusion import AttentionFusion, PoolAttention

    class PerTokenPool(PoolAttention):
        def pooled(self, query, tokens, valid=None):
            return self(query + torch.zeros_like(tokens[:, :1]), tokens, valid)[:, 0]

    copy = AttentionFusion(**fusion.config())
    copy.pool = PerTokenPool(copy.width, copy.heads, fusion.pool.dropout.p)
    copy.load_state_dict(fusion.state_dict())
    return copy.eval()


def _train_step(fusion, states, mask, reduced, autocast):
    fusion.train()
    fusion.zero_grad(set_to_none=True)
    with autocast:
        t, v = fusion.text_tokens(states), fusion.reduced_image_tokens(reduced)
        z = fusion.joint(t, mask, v)
        loss = (z * fusion.text_only(t, mask)).sum() + (z * fusion.image_only(v)).sum()
    loss.backward()


def compare(catalog: Path, fusion: Path | None, text_model: str, rounds: int, seconds: float) -> dict:
    """{"graphs": {(member, precision, batch): {form: [ms]}}, "diff": {member: max |diff|},
    "train": {form: [ms]}, "autocast": dtype, "items": training step rows}."""
    import numpy as np
    import torch

    from xmsearch.export.onnx import export_onnx, onnx_session
    from xmsearch.export.pipeline import FUSION_MEMBERS
    from xmsearch.export.quantize import quantize_int8
    from xmsearch.models.fusion import FusionEntry
    from xmsearch.train import bf16_supported, trim_padding

    ckpt, states, mask, regions, specs, kinds = fusion_inputs(catalog, fusion, text_model, 128)
    modules = {"per-token": unfolded(ckpt.fusion), "folded": ckpt.fusion.eval()}
    out: dict = {"graphs": {}, "diff": {}, "train": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for member in FUSION_MEMBERS:
            spec, names = specs[member], [t.name for t in specs[member].inputs]
            sessions = {}
            for form, module in modules.items():
                fp32 = export_onnx(FusionEntry(module, kinds[member]).eval(), spec,
                                   _inputs(member, states, mask, regions, slice(0, 2)),
                                   Path(tmp) / f"{member}-{form}.onnx")
                sessions[(form, "fp32")] = onnx_session(fp32, threads=2, spinning=False)
                sessions[(form, "int8")] = onnx_session(quantize_int8(fp32, Path(tmp) / f"{member}-{form}.int8.onnx"),
                                                        threads=2, spinning=False)
            feed = {n: x.numpy() for n, x in zip(names, _inputs(member, states, mask, regions, slice(0, 64)))}
            a, b = sessions[("per-token", "fp32")].run(None, feed), sessions[("folded", "fp32")].run(None, feed)
            out["diff"][member] = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
            for batch in BATCHES:
                feed = {n: x.numpy() for n, x in zip(names, _inputs(member, states, mask, regions, slice(0, batch)))}
                for precision in ("fp32", "int8"):
                    timed = alternated_ms_per_call({form: (lambda s=sessions[(form, precision)]: s.run(None, feed))
                                                    for form in FORMS}, rounds, seconds)
                    out["graphs"][(member, precision, batch)] = timed
    s, m = trim_padding(states, mask)
    reduced = ckpt.fusion.image_reduce(regions.float()).detach()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_supported())
    steps = {form: (lambda f=modules[form]: _train_step(f, s.float(), m, reduced, autocast)) for form in FORMS}
    out["train"] = alternated_ms_per_call(steps, rounds, seconds)
    out["autocast"], out["items"] = ("bf16" if bf16_supported() else "fp32"), len(states)
    return out


def report(results: dict, rounds: int, seconds: float, catalog: Path, fusion: Path | None) -> str:
    weights = f"checkpoint `{fusion}`" if fusion else "untrained (seeded) fusion weights at the trained layout"
    lines = [f"Medians over {rounds} alternated rounds (min-max), {seconds:g} s each; rows are catalogue items "
             f"of `{catalog}`; {weights}. ONNX Runtime: 2 threads, idle threads not spinning.", "",
             "| member | precision | rows | per-token ms | folded ms | folded / per-token |",
             "|---|---|---:|---:|---:|---:|"]
    for (member, precision, batch), t in results["graphs"].items():
        a, b = statistics.median(t["per-token"]), statistics.median(t["folded"])
        spread = {form: f"{min(t[form]):.3f}-{max(t[form]):.3f}" for form in FORMS}
        lines.append(f"| {member} | {precision} | {batch} | {a:.3f} ({spread['per-token']}) "
                     f"| {b:.3f} ({spread['folded']}) | {b / a:.2f}x |")
    t = results["train"]
    a, b = statistics.median(t["per-token"]), statistics.median(t["folded"])
    lines += ["", f"One training step's forward and backward passes, {results['items']} items ({results['autocast']}): "
              f"per-token {a:.1f} ms ({min(t['per-token']):.1f}-{max(t['per-token']):.1f}), folded {b:.1f} ms "
              f"({min(t['folded']):.1f}-{max(t['folded']):.1f}): {b / a:.2f}x.", "",
              "Largest |difference| between the two forms' fp32 graph outputs (64 items): "
              + ", ".join(f"{k} {v:.1e}" for k, v in results["diff"].items()) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = catalogue_parser(__doc__, fusion="trained fusion checkpoint (xmsearch train); without it, seeded "
                         "weights at the trained layout")
    p.add_argument("--text-model", default="multilingual-e5-small-q4", help="the checkpoint's text model")
    a = parse_catalogue_args(p, argv)
    results = compare(a.catalog, a.fusion, a.text_model, a.rounds, a.seconds)
    publish(report(results, a.rounds, a.seconds, a.catalog, a.fusion), a.out, "benchmarks.pool_fold", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
