"""Ingest throughput of the ``item`` ensemble: two parallel preprocessing branches vs one step.

Until the fix for the tritonserver 2.51 ensemble crash (see ``xmsearch.spec.ensemble_specs``),
``item`` ran ``tokenizer_item`` and ``image_preprocess`` side by side; now ``item_preprocess``
reads the title and the photo in one first step.  This measures what that costs: one
exported repository (untrained fusion: speed does not depend on the weights), a copy of it
rewired the old way, both served at once, and the same catalogue ingested through each in
alternating order, so machine noise hits both alike.  Prints per-run figures and the ratio
of medians.

Run from the repo root:  ``python -m benchmarks.item_wiring [--items 400] [--rounds 4] [--work DIR]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from xmsearch import spec as S
from xmsearch.client.embed import Embedder
from xmsearch.client.ingest import ingest_catalog
from xmsearch.demo import generate_demo_catalog
from xmsearch.export.pipeline import export_repository
from xmsearch.export.repository import read_config, write_config
from xmsearch.server import TritonServer, free_ports
from xmsearch.triton_models import SHIMS, shim_source

OLD_TOKENIZER = "tokenizer_item"


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> mc.ModelEnsembling.Step:
    step = mc.ModelEnsembling.Step(model_name=model, model_version=-1)
    step.input_map.update(inputs)
    step.output_map.update(outputs)
    return step


def rewire_parallel(repo: Path, out: Path) -> None:
    """Copy ``repo`` to ``out`` with ``item`` wired as before: tokenizer || image_preprocess."""
    shutil.copytree(repo, out)
    # The old tokenizer member: item_preprocess's folder (passage-role tokenizer files) and
    # config without the photo, served by the tokenizer class.
    shutil.copytree(out / S.ITEM_PREPROCESS, out / OLD_TOKENIZER)
    tok = read_config(out / OLD_TOKENIZER / "config.pbtxt")
    tok.name = OLD_TOKENIZER
    inputs = [t for t in tok.input if t.name != S.IMAGE]
    outputs = [t for t in tok.output if t.name != S.PIXEL_VALUES]
    tok.ClearField("input")
    tok.ClearField("output")
    tok.input.extend(inputs)
    tok.output.extend(outputs)
    tok.parameters["role"].string_value = "passage"
    write_config(tok, out / OLD_TOKENIZER)
    (out / OLD_TOKENIZER / "1").mkdir(exist_ok=True)
    (out / OLD_TOKENIZER / "1" / "model.py").write_text(shim_source(OLD_TOKENIZER, SHIMS[S.TOKENIZER_QUERY]))
    (out / OLD_TOKENIZER / "1" / "image_preprocess.json").unlink(missing_ok=True)
    item = read_config(out / S.ITEM / "config.pbtxt")
    rest = list(item.ensemble_scheduling.step)[1:]  # encoders and fusion stay as they are
    item.ensemble_scheduling.ClearField("step")
    item.ensemble_scheduling.step.extend([
        _step(OLD_TOKENIZER, {S.TEXT: S.TEXT},
              {S.INPUT_IDS: "input_ids", S.ATTENTION_MASK: "attention_mask"}),
        _step(S.IMAGE_PREPROCESS, {S.IMAGE: S.IMAGE}, {S.PIXEL_VALUES: "pixel_values"}),
        *rest])
    write_config(item, out / S.ITEM)
    shutil.rmtree(out / S.ITEM_PREPROCESS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=400, help="demo catalogue size (default 400)")
    p.add_argument("--rounds", type=int, default=4, help="ingests per wiring (default 4)")
    p.add_argument("--work", type=Path, help="folder for repositories and indexes (default: a temp dir)")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="xmsearch-item-wiring-"))
    new = work / "one-step"
    if not (new / S.ITEM).exists():
        export_repository(new, "cpu", untrained=True)
    old = work / "parallel"
    if not old.exists():
        rewire_parallel(new, old)
    catalog = work / "catalogue" / "catalog.jsonl"
    if not catalog.exists():
        generate_demo_catalog(catalog.parent, n=a.items, seed=1, n_queries=0)
    servers: dict[str, TritonServer] = {}
    rates: dict[str, list[float]] = {"parallel": [], "one-step": []}
    try:
        for name, repo in (("parallel", old), ("one-step", new)):
            grpc, http, metrics = free_ports(3)
            servers[name] = TritonServer(repo, grpc, http, metrics, log_file=work / f"{name}.log",
                                         die_with_parent=True, exit_timeout_s=2)
            servers[name].start(wait=True, timeout=180)
        for rnd in range(a.rounds):
            order = ("parallel", "one-step") if rnd % 2 == 0 else ("one-step", "parallel")
            for name in order:
                embedder = Embedder(servers[name].url, timeout_s=120)
                index = work / f"index-{name}"
                shutil.rmtree(index, ignore_errors=True)
                report = ingest_catalog(catalog, index, embedder, chunk_size=256)
                embedder.close()
                rates[name].append(report.added / report.seconds)
                print(f"round {rnd} {name:9s}: {report.added} items in {report.seconds:.1f} s "
                      f"= {rates[name][-1]:.1f} items/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"median items/s: parallel branches {med['parallel']:.1f}, one first step {med['one-step']:.1f}; "
          f"one-step / parallel = {med['one-step'] / med['parallel']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
