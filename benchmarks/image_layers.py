"""Which depths of the frozen image trunk tell two products of one kind apart?

For every photo query of a demo catalogue (a new photo of one catalogue product), rank the
catalogue photos by cosine similarity of raw, untrained features taken at each block of
EfficientNet-Lite0 (mean- and GeM-pooled over the image, and the 7x7 grid flattened),
and report Recall@1 / Recall@10 of the photographed product.  This is the measurement
behind the multi-scale regions of :mod:`xmsearch.models.image`.

    .venv/bin/python -m benchmarks.image_layers --catalog demo --out benchmarks/results/image_layers.txt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from xmsearch.catalog import read_catalog
from xmsearch.evaluate import load_queries
from xmsearch.models.image import ImageEncoder
from xmsearch.preprocess import ImagePreprocessor


@torch.no_grad()
def block_maps(enc: ImageEncoder, px: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block output and the head conv, average-pooled onto the 7x7 grid."""
    *blocks, head = enc.trunk.maps(px, range(len(enc.trunk.net._blocks)))
    out = {f"block {i:2d} ({x.shape[1]} ch, stride {224 // x.shape[-1]})": F.adaptive_avg_pool2d(x, 7)
           for i, x in enumerate(blocks)}
    out[f"head ({head.shape[1]} ch, stride {224 // head.shape[-1]})"] = head
    return out


def features(enc, pre, paths, desc) -> dict[str, torch.Tensor]:
    acc: dict[str, list] = {}
    for i in tqdm(range(0, len(paths), 32), desc=desc, unit="batch"):
        px = torch.from_numpy(np.stack([pre(Path(p).read_bytes(), what=str(p)) for p in paths[i:i + 32]]))
        for k, v in block_maps(enc, px).items():
            acc.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in acc.items()}


def recall(c: torch.Tensor, q: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    s = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T
    top = s.topk(10, dim=1).indices
    return top[:, 0].eq(target).float().mean().item(), top.eq(target[:, None]).any(1).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", type=Path, required=True, help="demo catalogue dir (catalog.jsonl, queries.jsonl)")
    p.add_argument("--out", type=Path, help="also write the table here")
    a = p.parse_args(argv)
    t0 = time.time()
    rows, _ = read_catalog(a.catalog / "catalog.jsonl")
    queries = [q for q in load_queries(a.catalog / "queries.jsonl") if q["kind"] == "image"]
    ids = {r.id: i for i, r in enumerate(rows)}
    target = torch.tensor([ids[next(iter(q["relevant"]))] for q in queries])
    enc = ImageEncoder("efficientnet-lite0")
    pre = ImagePreprocessor(enc.preprocess)
    cat = features(enc, pre, [r.image for r in rows], "catalogue photos")
    qry = features(enc, pre, [q["image"] for q in queries], "query photos")
    pools = {"mean": lambda x: x.mean((2, 3)),
             "GeM p=3": lambda x: x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3),
             "7x7 grid": lambda x: x.flatten(1)}
    lines = [f"photo query -> same product, raw frozen EfficientNet-Lite0 features, "
             f"{len(rows)} catalogue photos, {len(queries)} queries (R@1 / R@10)", "",
             f"| depth | {' | '.join(pools)} |", "|---|" + "---:|" * len(pools)]
    for name in cat:
        cells = [("%.3f / %.3f" % recall(f(cat[name]), f(qry[name]), target)) for f in pools.values()]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", f"({time.time() - t0:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(f"$ .venv/bin/python -m benchmarks.image_layers --catalog {a.catalog} --out {a.out}\n\n"
                         + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
