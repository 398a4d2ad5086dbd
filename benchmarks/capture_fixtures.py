"""Capture real perf_analyzer output for the parser's test fixtures.

Starts a throwaway tritonserver (the project's :class:`xmsearch.server.TritonServer`, i.e.
the binary bundled in the nvidia-pytriton wheel) on free ports with tiny python-backend
models of its own -- a "tokenizer" step, an
"embed" step, an ensemble wiring the two, and an image model that really decodes JPEG
bytes -- then runs :func:`benchmarks.perf_sweep.run_sweep` against them and copies the
CSV files and console output to ``tests/fixtures/perf_analyzer/``.

The toy models are *not* xmsearch's models: they only make perf_analyzer produce the
same CSV shapes (plain model, ensemble with composing models, BYTES image input) that
the real sweep produces, so the parser is tested on real text rather than on a guess.

Run from the repo root:  ``python -m benchmarks.capture_fixtures [--out DIR]``
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from PIL import Image

from benchmarks import input_data, perf_sweep
from xmsearch.errors import ServerError

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]

_TOKENIZE_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            texts = pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy().reshape(-1)
            ids = np.zeros((len(texts), 16), dtype=np.int64)
            for i, t in enumerate(texts):
                codes = list(bytes(t))[:16]
                ids[i, : len(codes)] = codes
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("IDS", ids)]))
        return out
'''

_EMBED_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        self.w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)

    def execute(self, requests):
        out = []
        for r in requests:
            ids = pb_utils.get_input_tensor_by_name(r, "IDS").as_numpy().astype(np.float32)
            x = ids @ self.w
            x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-6
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("EMBEDDING", x)]))
        return out
'''

_IMAGE_PY = '''
import io
import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            blobs = pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy().reshape(-1)
            try:
                vecs = []
                for b in blobs:
                    img = Image.open(io.BytesIO(bytes(b))).convert("RGB").resize((8, 8))
                    vecs.append(np.asarray(img, dtype=np.float32).mean(axis=(0, 1)))
                out.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("EMBEDDING", np.stack(vecs).astype(np.float32))]))
            except Exception as e:  # one bad image fails its own request only
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"toy_image: cannot decode IMAGE: {e}")))
        return out
'''


def _config(name: str, inputs: list[tuple[str, str, str]], outputs: list[tuple[str, str, str]],
            backend: str | None = "python", extra: str = "") -> str:
    def tensors(kind: str, items: list[tuple[str, str, str]]) -> str:
        body = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] }}' for n, t, d in items)
        return f"{kind} [\n{body}\n]\n"

    head = f'name: "{name}"\n' + (f'backend: "{backend}"\n' if backend else 'platform: "ensemble"\n')
    return head + "max_batch_size: 8\n" + tensors("input", inputs) + tensors("output", outputs) + extra


def write_toy_repository(root: Path) -> None:
    """Write the throwaway model repository (toy_tokenize, toy_embed, toy_text, toy_image)."""
    batching = "dynamic_batching { max_queue_delay_microseconds: 500 }\ninstance_group [ { kind: KIND_CPU count: 1 } ]\n"
    models = {
        "toy_tokenize": (_config("toy_tokenize", [("TEXT", "TYPE_STRING", "1")],
                                 [("IDS", "TYPE_INT64", "16")], extra=batching), _TOKENIZE_PY),
        "toy_embed": (_config("toy_embed", [("IDS", "TYPE_INT64", "16")],
                              [("EMBEDDING", "TYPE_FP32", "8")], extra=batching), _EMBED_PY),
        "toy_image": (_config("toy_image", [("IMAGE", "TYPE_STRING", "1")],
                              [("EMBEDDING", "TYPE_FP32", "3")], extra=batching), _IMAGE_PY),
    }
    for name, (config, code) in models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config)
        (root / name / "1" / "model.py").write_text(code)
    ensemble = _config("toy_text", [("TEXT", "TYPE_STRING", "1")], [("EMBEDDING", "TYPE_FP32", "8")],
                       backend=None, extra="""ensemble_scheduling { step [
  { model_name: "toy_tokenize" model_version: -1
    input_map { key: "TEXT" value: "TEXT" } output_map { key: "IDS" value: "ids" } },
  { model_name: "toy_embed" model_version: -1
    input_map { key: "IDS" value: "ids" } output_map { key: "EMBEDDING" value: "EMBEDDING" } }
] }
""")
    (root / "toy_text" / "1").mkdir(parents=True)
    (root / "toy_text" / "config.pbtxt").write_text(ensemble)


@contextmanager
def toy_tritonserver(repo: Path, work: Path, timeout_s: float = 120.0) -> Iterator[dict[str, int]]:
    """Serve ``repo`` with the project's :class:`xmsearch.server.TritonServer` on free ports.

    Yields ``{"grpc": port, "http": port, "metrics": port}``; the server is stopped after.
    """
    from xmsearch.server import TritonServer, free_ports

    grpc, http, metrics = free_ports(3)
    server = TritonServer(repo, grpc_port=grpc, http_port=http, metrics_port=metrics,
                          log_file=work / "tritonserver.log")
    server.start(wait=True, timeout=timeout_s)
    try:
        yield {"grpc": grpc, "http": http, "metrics": metrics}
    finally:
        server.stop()


def _tiny_catalogue(folder: Path) -> Path:
    """Three products with real JPEG photos, as catalog.jsonl."""
    import json

    rows = []
    for i, (title, colour) in enumerate([("red cotton t-shirt", (200, 30, 30)),
                                         ("blue denim jacket", (30, 60, 200)),
                                         ("green ceramic mug", (40, 160, 60))]):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), colour).save(folder / "images" / f"p{i}.jpg", quality=90)
        rows.append({"id": f"p{i}", "title": title, "image": f"images/p{i}.jpg"})
    path = folder / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scrub(text: str, work: Path, ports: dict[str, int]) -> str:
    # Temp paths and ports change every run; fixed placeholders keep fixtures diffable.
    text = text.replace(str(work), "/tmp/CAPTURE").replace(str(REPO), "<repo>")
    for port_name, port in ports.items():
        text = text.replace(f"localhost:{port}", f"localhost:<{port_name}-port>")
    return text


def capture(out_dir: Path) -> list[Path]:
    """Run short sweeps against the toy server and copy the raw outputs to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = perf_sweep.find_perf_analyzer()
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="xmsearch-capture-") as tmp:
        work = Path(tmp)
        (work / "repo").mkdir()
        write_toy_repository(work / "repo")
        catalogue = _tiny_catalogue(work / "catalogue")
        text_json = input_data.write_input_data(work / "text.json", catalogue, kind="text")
        image_json = input_data.write_input_data(work / "image.json", catalogue, kind="image")
        with toy_tritonserver(work / "repo", work) as ports:
            base = perf_sweep.SweepSettings(concurrency=(1, 2), measurement_interval_ms=1500,
                                            stability_percentage=50, max_trials=8)
            runs = [
                # The ensemble: composing-model blocks in the console output.
                ("toy_text", text_json, "ensemble_verbose", base),
                # Real JPEG bytes through b64 BYTES input data, plus --collect-metrics columns.
                ("toy_image", image_json, "image_metrics", replace(base, collect_metrics=True)),
                # The plain (non-verbose) CSV layout.
                ("toy_text", text_json, "ensemble_plain", replace(base, verbose_csv=False)),
            ]
            for model, data, name, settings in runs:
                result = perf_sweep.run_sweep(
                    model, url=f"localhost:{ports['grpc']}", input_data_path=data,
                    out_dir=work / "sweeps" / name, settings=settings, perf_analyzer=exe,
                    metrics_url=f"localhost:{ports['metrics']}/metrics")
                for src, suffix in [(result.csv_path, ".csv"), (result.log_path, ".log")]:
                    dst = out_dir / f"{name}{suffix}"
                    dst.write_text(_scrub(src.read_text(), work, ports))
                    written.append(dst)
            # One run over a range: the CSV is then sorted by throughput and the console
            # holds one "Request concurrency" block per level.
            range_csv = work / "range.csv"
            cmd = perf_sweep.build_command(exe, "toy_text", f"localhost:{ports['grpc']}", text_json,
                                           range_csv, 1, base)
            cmd[cmd.index("1:1")] = "1:3"
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise ServerError(f"capture: range run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
            for text, name in [(range_csv.read_text(), "ensemble_range.csv"),
                               (f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}", "ensemble_range.log")]:
                (out_dir / name).write_text(_scrub(text, work, ports))
                written.append(out_dir / name)
            shutil.copyfile(text_json, out_dir / "input_text.json")
            written.append(out_dir / "input_text.json")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "perf_analyzer",
                        help="folder for the captured CSV/log files (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in capture(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
