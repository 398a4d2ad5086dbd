"""What int8 does to the served fusion graphs: speed side by side, and how far the vectors move.

The four fusion members (``fusion_text``, ``fusion_image``, ``fusion_joint``, ``fusion_item``)
are exported from a trained checkpoint as ``xmsearch export`` does, in fp32 and in int8
(``--fusion-precision int8``: ``xmsearch.export.quantize``, weights per output channel,
activations per token; the attention products between activations stay fp32), and run in
ONNX Runtime as the cpu target runs them (2 threads, idle threads not spinning) on real
inputs: token states of catalogue titles from the text encoder and regions of catalogue
photos from the image encoder.

Figures: milliseconds per call for one row and for batches of 16 and 32, rounds alternated;
per output, the lowest cosine between a row's int8 and fp32 vector over the first
``--items`` catalogue items (the export holds the int8 graph to PyTorch at
``FUSION_INT8_MIN_COSINE``) and how often the two graphs agree on an item's nearest
neighbour among the others (a retrieval-level view of the same drift).  What int8 does
to retrieval through the server comes from ``xmsearch eval`` on both exports.

    .venv/bin/python -m benchmarks.fusion_int8 --catalog demo \\
        --fusion demo/fusion-multilingual-e5-small-q4.pt --text-model multilingual-e5-small-q4 \\
        --out benchmarks/results/fusion_int8.md
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks import catalogue_parser, parse_catalogue_args, publish
from benchmarks.loadgen import alternated_ms_per_call

VARIANTS = ("fp32", "int8")
BATCHES = (1, 16, 32)


def _inputs(member: str, states, mask, regions, rows: slice) -> tuple:
    from xmsearch import spec as S

    if member == S.FUSION_TEXT:
        return states[rows], mask[rows]
    if member == S.FUSION_IMAGE:
        return (regions[rows],)
    return states[rows], mask[rows], regions[rows]


def fusion_inputs(catalog: Path, fusion: Path | None, text_model: str, n: int):
    """``(checkpoint, token states, mask, regions, member specs, entry kinds)`` for the first
    ``n`` items of ``catalog``: the fusion members' real inputs, from the frozen encoders."""
    import torch

    from xmsearch import spec as S
    from xmsearch.catalog import read_catalog
    from xmsearch.export.pipeline import load_fusion
    from xmsearch.pipeline import Encoders

    enc = Encoders.load(text_model)
    ckpt = load_fusion(enc, fusion, untrained=fusion is None)
    rows, _ = read_catalog(catalog / "catalog.jsonl")
    rows = rows[:n]
    with torch.no_grad():
        states, mask = enc.text_states([r.title for r in rows], "passage")
        regions = enc.image_regions([Path(r.image).read_bytes() for r in rows])
    d = enc.dims
    specs = S.member_specs(S.Dims(d.text_dim, d.image_dim, d.regions, d.image_size, ckpt.fusion.embed_dim,
                                  d.max_length))
    kinds = {S.FUSION_TEXT: "text", S.FUSION_IMAGE: "image", S.FUSION_JOINT: "joint", S.FUSION_ITEM: "item"}
    return ckpt, states, mask, regions, specs, kinds


def compare(catalog: Path, fusion: Path | None, text_model: str, items: int, rounds: int, seconds: float) -> dict:
    """{member: {"ms": {(variant, batch): [ms per round]}, "cosine": {output: min}, "agree": {output: share}}}."""
    import numpy as np

    from xmsearch.export.onnx import export_onnx, onnx_session
    from xmsearch.export.pipeline import FUSION_MEMBERS
    from xmsearch.export.quantize import quantize_int8
    from xmsearch.models.fusion import FusionEntry

    ckpt, states, mask, regions, specs, kinds = fusion_inputs(catalog, fusion, text_model, max(items, max(BATCHES)))
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for member in FUSION_MEMBERS:
            module, spec = FusionEntry(ckpt.fusion, kinds[member]).eval(), specs[member]
            fp32 = export_onnx(module, spec, _inputs(member, states, mask, regions, slice(0, 2)),
                               Path(tmp) / f"{member}.onnx")
            paths = {"fp32": fp32, "int8": quantize_int8(fp32, Path(tmp) / f"{member}.int8.onnx")}
            sessions = {v: onnx_session(p, threads=2, spinning=False) for v, p in paths.items()}
            names_in = [t.name for t in spec.inputs]
            everything = {n: x.numpy() for n, x in zip(names_in, _inputs(member, states, mask, regions,
                                                                            slice(0, items)))}
            vectors = {v: s.run(None, everything) for v, s in sessions.items()}
            cosine, agree = {}, {}
            for k, t in enumerate(spec.outputs):
                a, b = vectors["fp32"][k], vectors["int8"][k]
                cosine[t.name] = float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
                nn = {}
                for v in VARIANTS:
                    z = vectors[v][k]
                    sim = z @ z.T
                    np.fill_diagonal(sim, -np.inf)
                    nn[v] = sim.argmax(1)
                agree[t.name] = float(np.mean(nn["fp32"] == nn["int8"]))
            ms: dict = {}
            for batch in BATCHES:
                feed = {n: x.numpy() for n, x in zip(names_in, _inputs(member, states, mask, regions,
                                                                        slice(0, batch)))}
                timed = alternated_ms_per_call({v: (lambda s=s: s.run(None, feed)) for v, s in sessions.items()},
                                               rounds, seconds)
                ms.update({(v, batch): t for v, t in timed.items()})
            out[member] = {"ms": ms, "cosine": cosine, "agree": agree}
    return out


def report(results: dict, items: int, rounds: int, seconds: float, catalog: Path, fusion: Path | None) -> str:
    weights = f"checkpoint `{fusion}`" if fusion else "untrained (seeded) fusion weights at the trained layout"
    lines = [f"ONNX Runtime, 2 threads, idle threads not spinning; medians over {rounds} alternated rounds "
             f"(min-max), {seconds:g} s each; rows are catalogue items of `{catalog}` (titles' token "
             f"states, photos' regions); {weights}.", "",
             "| member | rows | fp32 ms per call | int8 ms per call | int8 / fp32 |", "|---|---:|---:|---:|---:|"]
    for member, r in results.items():
        for batch in BATCHES:
            f, q = r["ms"][("fp32", batch)], r["ms"][("int8", batch)]
            mf, mq = statistics.median(f), statistics.median(q)
            lines.append(f"| {member} | {batch} | {mf:.3f} ({min(f):.3f}-{max(f):.3f}) "
                         f"| {mq:.3f} ({min(q):.3f}-{max(q):.3f}) | {mq / mf:.2f}x |")
    lines += ["", f"Vectors of the first {items} items, int8 against fp32:", "",
              "| member | output | lowest cosine | same nearest neighbour |", "|---|---|---:|---:|"]
    for member, r in results.items():
        for name, cos in r["cosine"].items():
            lines.append(f"| {member} | {name} | {cos:.5f} | {r['agree'][name]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = catalogue_parser(__doc__, fusion="trained fusion checkpoint (xmsearch train); without it, seeded weights "
                         "at the trained layout: timings hold, the vector figures mean little")
    p.add_argument("--text-model", default="multilingual-e5-small-q4", help="the checkpoint's text model")
    p.add_argument("--items", type=int, default=256, help="catalogue items whose vectors are compared")
    a = parse_catalogue_args(p, argv)
    if a.items < 2:
        p.error("--items must be 2 or more")
    results = compare(a.catalog, a.fusion, a.text_model, a.items, a.rounds, a.seconds)
    publish(report(results, a.items, a.rounds, a.seconds, a.catalog, a.fusion), a.out, "benchmarks.fusion_int8", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
