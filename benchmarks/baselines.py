"""In-process baselines the served numbers are compared with, on the same inputs.

* :class:`TorchBaseline` -- the reference path (:class:`xmsearch.pipeline.ReferencePipeline`):
  frozen PyTorch encoders and the same fusion weights the repository was exported from,
  loaded once.
* :class:`OnnxBaseline` -- ONNX Runtime on the repository's own exported graphs with the
  repository's own preprocessing files: tokenizer -> ``text_encoder.onnx`` ->
  ``fusion_text.onnx``; image preprocess -> ``image_encoder.onnx`` -> ``fusion_image.onnx``.
  This is what the served python-backend members run, minus Triton, gRPC and batching.

Each query, served or not, ends in the same FAISS search of the same index, so every
number compares whole queries (encode + top-10).  :func:`measure` runs one baseline one
query at a time and in batches through :func:`benchmarks.loadgen.closed_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmarks.loadgen import LoadResult, closed_loop, timed_batches
from xmsearch import spec
from xmsearch.preprocess import decode_text

Embed = Callable[[list], np.ndarray]


class TorchBaseline:
    """The PyTorch reference pipeline, models loaded once."""

    name = "PyTorch (ReferencePipeline)"

    def __init__(self, text_model: str = spec.DEFAULT_TEXT_MODEL, fusion: Path | None = None):
        from xmsearch.export.pipeline import load_fusion
        from xmsearch.pipeline import Encoders, ReferencePipeline

        encoders = Encoders.load(text_model)
        # Same rule as the export: a checkpoint, or the seeded untrained module.
        checkpoint = load_fusion(encoders, fusion, untrained=fusion is None)
        self.pipeline = ReferencePipeline(encoders, checkpoint.fusion)

    def text(self, texts: list[str]) -> np.ndarray:
        return self.pipeline.embed(texts=texts, role="query")

    def image(self, images: list[bytes]) -> np.ndarray:
        return self.pipeline.embed(images=images)


class OnnxBaseline:
    """ONNX Runtime on the exported graphs of a model repository."""

    name = "ONNX Runtime (exported graphs)"

    def __init__(self, repository: Path, threads: int = 0):
        from xmsearch.export.onnx import onnx_session
        from xmsearch.preprocess import ImagePreprocessor, TextPreprocessor

        repository = Path(repository)
        self.text_pre = TextPreprocessor.from_dir(spec.query_tokenizer_folder(repository))
        self.image_pre = ImagePreprocessor.from_dir(repository / spec.IMAGE_PREPROCESS / "1")
        self.sessions = {m: onnx_session(repository / m / "1" / "model.onnx", threads)
                         for m in (spec.TEXT_ENCODER, spec.IMAGE_ENCODER, spec.FUSION_TEXT,
                                   spec.FUSION_IMAGE)}

    def token_inputs(self, texts: Sequence[str], role: str = "query") -> tuple[np.ndarray, np.ndarray]:
        texts = [decode_text(t, what=f"text[{i}]") for i, t in enumerate(texts)]
        return self.text_pre.encode(texts, role)

    def pixels(self, images: Sequence[bytes]) -> np.ndarray:
        return np.stack([self.image_pre(b, what=f"image[{i}]") for i, b in enumerate(images)])

    def token_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.sessions[spec.TEXT_ENCODER].run(
            [spec.TOKEN_STATES], {spec.INPUT_IDS: ids, spec.ATTENTION_MASK: mask})[0]

    def regions(self, pixels: np.ndarray) -> np.ndarray:
        return self.sessions[spec.IMAGE_ENCODER].run([spec.IMAGE_REGIONS], {spec.PIXEL_VALUES: pixels})[0]

    def text(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.token_inputs(texts)
        states = self.token_states(ids, mask)
        return self.sessions[spec.FUSION_TEXT].run(
            [spec.EMBEDDING], {spec.TOKEN_STATES: states, spec.ATTENTION_MASK: mask})[0]

    def image(self, images: list[bytes]) -> np.ndarray:
        return self.sessions[spec.FUSION_IMAGE].run(
            [spec.EMBEDDING], {spec.IMAGE_REGIONS: self.regions(self.pixels(images))})[0]


def member_input_rows(onnx: OnnxBaseline, member: str, texts: Sequence[str], images: Sequence[bytes],
                      n: int = 16) -> list[dict[str, np.ndarray]]:
    """Real input rows (no batch axis) for a member model, computed through ``onnx``.

    perf_analyzer's random data would be meaningless for token ids (out of vocabulary)
    and unlike real inputs for the rest; these are what the ensemble feeds the member.
    """
    rows: list[dict[str, np.ndarray]] = []
    for i in range(n):
        text, image = texts[i % len(texts)], images[i % len(images)]
        ids, mask = onnx.token_inputs([text])
        if member == spec.TEXT_ENCODER:
            rows.append({spec.INPUT_IDS: ids[0], spec.ATTENTION_MASK: mask[0]})
        elif member == spec.IMAGE_ENCODER:
            rows.append({spec.PIXEL_VALUES: onnx.pixels([image])[0]})
        elif member == spec.FUSION_JOINT:
            rows.append({spec.TOKEN_STATES: onnx.token_states(ids, mask)[0], spec.ATTENTION_MASK: mask[0],
                         spec.IMAGE_REGIONS: onnx.regions(onnx.pixels([image]))[0]})
        else:
            raise ValueError(f"member_input_rows: no input recipe for member {member!r}")
    return rows


def write_member_inputs(repository: Path, members: Sequence[str], texts: Sequence[str],
                        images: Sequence[bytes], folder: Path, n: int = 16) -> dict[str, Path]:
    """perf_analyzer input files ``folder/<member>.json`` of ``n`` real rows per member
    (``member_input_rows`` through the repository's graphs), by member name."""
    from benchmarks import input_data

    if not members:
        return {}
    onnx = OnnxBaseline(repository)
    return {m: input_data.write_tensor_input_data(Path(folder) / f"{m}.json",
                                                  member_input_rows(onnx, m, texts, images, n=n))
            for m in members}


@dataclass(frozen=True)
class BaselinePlan:
    """How long to measure and which batch sizes to try."""

    duration_s: float = 5.0
    warmup_s: float = 1.0
    batch_sizes: tuple[int, ...] = (16, 32)


def _query(embed: Embed, search: Callable[[np.ndarray], object]) -> Callable[[list], object]:
    def run(batch: list) -> object:
        return search(embed(batch))
    return run


def measure(baseline: TorchBaseline | OnnxBaseline, texts: Sequence[str], images: Sequence[bytes],
            search: Callable[[np.ndarray], object], plan: BaselinePlan = BaselinePlan(),
            on_result: Callable[[LoadResult], None] = lambda r: None,
            search_photo: Callable[[np.ndarray], object] | None = None) -> list[LoadResult]:
    """Text and image queries, one at a time and batched; labels ``"<kind>"`` with ``batch`` set.
    Image queries search with ``search_photo`` where given (``CatalogIndex.search_photo``, as
    the served path does), else with ``search``."""
    results: list[LoadResult] = []
    for kind, embed, data in (("text", baseline.text, list(texts)), ("image", baseline.image, list(images))):
        fn = _query(embed, search_photo if kind == "image" and search_photo is not None else search)
        for batch in (1, *plan.batch_sizes):
            batches = [[data[(start + j) % len(data)] for j in range(batch)] for start in range(0, len(data), batch)]
            if batch == 1:
                result = closed_loop(fn, batches, 1, plan.duration_s, label=kind, warmup_s=plan.warmup_s)
            else:
                result = timed_batches(fn, batches, plan.duration_s, label=kind, batch=batch)
            results.append(result)
            on_result(result)
    return results
