"""``xmsearch export``: PyTorch models -> a checked Triton model repository.

Steps: load the frozen encoders and the fusion checkpoint (refusing a mismatched or
tampered one), export five ONNX graphs, check each against PyTorch on real inputs,
write tokenizer/preprocessing artefacts, fingerprint the result, generate every
config.pbtxt through Triton's protobuf schema and, for the tensorrt target, build and
check the engines.  The repository is assembled in a temporary folder next to ``out``
and moved into place member by member, so a failed export never leaves a half-written
model where a server would load it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from xmsearch import spec as S
from xmsearch.checkpoint import FusionCheckpoint
from xmsearch.errors import CheckpointError, ModelError
from xmsearch.export import onnx as onnx_export
from xmsearch.export import quantize
from xmsearch.export.repository import NEURAL, TARGETS, TargetSettings, repository_configs, write_config
from xmsearch.models.fusion import AttentionFusion, FusionEntry
from xmsearch.models.image import DEFAULT_IMAGE_MODEL
from xmsearch.models.text import DEFAULT_TEXT_MODEL
from xmsearch.onnxrt import EXTERNAL_DATA_SUFFIX, store_large_initializers_outside
from xmsearch.pipeline import Encoders
from xmsearch.train import TrainConfig
from xmsearch.triton_models import shim_source

log = logging.getLogger(__name__)

# Real text for the parity checks: product titles and queries, both languages.
SAMPLE_TEXTS = [
    "blue down jacket", "navy puffer coat, men, water-repellent hood",
    "women's red dress, striped, summer", "black leather ankle boots size 38",
    "蓝色羽绒服", "红色条纹连衣裙 女款", "white canvas sneakers with green sole",
    "small brown crossbody handbag with gold buckle and adjustable strap, vegan leather",
]


@dataclass
class ExportResult:
    out: Path
    target: str
    fingerprint: str
    parity: list = field(default_factory=list)  # ParityReport per graph
    trained: bool = True
    engines: list = field(default_factory=list)
    text_precision: str = "fp32"  # of the served text encoder graph: fp32 or int8
    fusion_precision: str = "fp32"  # of the four served fusion graphs: fp32 or int8


def sample_images(n: int = 4, seed: int = 0) -> list[bytes]:
    """A few photo-like JPEGs (gradients, shapes, noise) for the parity checks."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (320, 240) if i % 2 else (256, 300)
        base = np.linspace(rng.uniform(60, 200, 3), rng.uniform(60, 200, 3), h)[:, None, :]
        arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        d = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
            d.ellipse([x0, y0, x0 + rng.integers(40, w // 2), y0 + rng.integers(40, h // 2)],
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def load_fusion(encoders: Encoders, checkpoint: Path | None, untrained: bool) -> FusionCheckpoint:
    """The checkpoint to export; never a silent random default."""
    if checkpoint is None and not untrained:
        raise CheckpointError("export needs trained fusion weights: pass --fusion CKPT "
                              "(from `xmsearch train`) or, for plumbing tests only, --untrained")
    if checkpoint is not None and untrained:
        raise CheckpointError("pass either --fusion CKPT or --untrained, not both")
    d = encoders.dims
    if checkpoint is None:
        torch.manual_seed(0)
        # The layout training produces (TrainConfig's), so that plumbing tests serve the
        # same graphs (and the benchmarks time them): its width, the frozen reduction of the
        # regions (random here, a PCA once trained), with query_cross fusion_joint and
        # fusion_item differ, and fusion_item adds the single-modality embeddings (item_mix).
        cfg = TrainConfig()
        return FusionCheckpoint(AttentionFusion(d.text_dim, d.image_dim, width=cfg.width, embed_dim=d.embed_dim,
                                                image_reduce_dim=cfg.image_reduce_dim,
                                                query_cross=cfg.query_cross, item_mix=cfg.item_mix).eval(),
                                encoders.text_model, encoders.image_model, trained=False)
    ckpt = FusionCheckpoint.load(checkpoint)
    ckpt.check_encoders(encoders.text_model, d.text_dim, encoders.image_model, d.image_dim, checkpoint)
    return ckpt


def _graphs(enc: Encoders, fusion: AttentionFusion, dims: S.Dims):
    """(member, module, example, parity cases) for every neural member, from real inputs."""
    texts, images = SAMPLE_TEXTS, sample_images()
    states, m = enc.text_states(texts, "passage")
    ids_t = torch.from_numpy(enc.text_pre.encode(texts, "passage")[0])
    with torch.no_grad():
        regions = enc.image_regions(images)
    px = torch.from_numpy(np.stack([enc.image_pre(b) for b in images]))
    short_ids, short_mask = (torch.from_numpy(a) for a in enc.text_pre.encode(texts[:3], "query"))
    with torch.no_grad():
        short_states = enc.text(short_ids, short_mask)
    yield (S.TEXT_ENCODER, enc.text, (ids_t[:2], m[:2]),
           [(ids_t, m), (short_ids, short_mask), (ids_t[:1], m[:1])])
    yield (S.IMAGE_ENCODER, enc.image, (px[:2],), [(px,), (px[:1],)])
    yield (S.FUSION_TEXT, FusionEntry(fusion, "text"), (states[:2], m[:2]),
           [(states, m), (short_states, short_mask)])
    yield (S.FUSION_IMAGE, FusionEntry(fusion, "image"), (regions[:2],), [(regions,), (regions[:1],)])
    n = min(len(texts), len(images))
    for member, kind in ((S.FUSION_JOINT, "joint"), (S.FUSION_ITEM, "item")):
        yield (member, FusionEntry(fusion, kind), (states[:2], m[:2], regions[:2]),
               [(states[:n], m[:n], regions[:n]), (short_states, short_mask, regions[:3])])


FUSION_MEMBERS = (S.FUSION_TEXT, S.FUSION_IMAGE, S.FUSION_JOINT, S.FUSION_ITEM)


def quantize_member(module, spec: S.ModelSpec, path: Path, cases: list[tuple], step):
    """Replace the fp32 graph at ``path`` by its int8 version (``xmsearch.export.quantize``)
    and check it: against PyTorch at the member's int8 bound, and row by row alone vs
    batched.  Returns the int8 graph's ParityReports."""
    step(f"quantizing {spec.name} to int8 (weights per output channel, activations per token)")
    fp32_path = path.with_name("model.fp32.onnx")
    path.rename(fp32_path)
    quantize.quantize_int8(fp32_path, path)
    fp32_path.unlink()
    session = onnx_export.onnx_session(path)  # one session for both checks
    if spec.name == S.TEXT_ENCODER:
        reports = [quantize.check_int8_parity(module, path, cases, session=session)]
        drift = quantize.check_batch_independence(path, cases, session=session)
    else:
        try:
            reports = onnx_export.check_parity(module, spec, path, cases, quantize.FUSION_INT8_MIN_COSINE,
                                               session=session, label=f"{spec.name} (int8)")
            drift = quantize.check_rows_independent(session, spec, cases[0])
        except ModelError as e:
            raise ModelError(f"int8 {spec.name}: {e}; export with --fusion-precision fp32") from e
    step(f"  batch independence: a row alone vs in its batch, max |diff| {drift:.2e}")
    return reports


def fingerprint_of(folder: Path, members: list[str]) -> str:
    """SHA-256 over every weight/tokenizer/preprocessing file the vectors depend on."""
    h = hashlib.sha256()
    for member in sorted(members):
        for f in sorted((folder / member / "1").glob("*")):
            if f.suffix in (".onnx", ".json", EXTERNAL_DATA_SUFFIX) and f.is_file():
                h.update(f"{member}/{f.name}".encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def export_repository(out: Path, target: str = "cpu", fusion_checkpoint: Path | None = None,
                      untrained: bool = False, text_model: str = DEFAULT_TEXT_MODEL,
                      image_model: str = DEFAULT_IMAGE_MODEL, image_checkpoint: Path | None = None,
                      settings: TargetSettings | None = None, precision: str = "fp16",
                      min_cosine: float = 0.9999, text_precision: str = "auto",
                      fusion_precision: str = "auto",
                      step: Callable[[str], None] = lambda msg: None) -> ExportResult:
    """Export the models and write a complete, checked model repository into ``out``.

    ``text_precision``: the served text encoder graph, "fp32", "int8" (dynamic ONNX Runtime
    quantization with one activation scale per token, CPU only: ``xmsearch.export.quantize``)
    or "auto" (int8 where the text encoder runs on ONNX Runtime's CPU provider, fp32 on a GPU).
    ``fusion_precision``: the same choice for the four fusion graphs (int8 on the same
    per-token scheme; their attention products between activations stay fp32).
    Every graph is first checked in fp32 against PyTorch at ``min_cosine``; an int8 graph
    is then checked again at its own bound, and for rows that come out the same alone or
    batched.
    """
    if target not in TARGETS:
        raise ModelError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    settings = settings or TargetSettings(target)
    text_precision = quantize.resolve_precision(text_precision, settings.on_gpu, what="text")
    fusion_precision = quantize.resolve_precision(fusion_precision, settings.on_gpu, what="fusion")
    if target == "tensorrt":
        from xmsearch.export import tensorrt as trt_export

        trt_export.require_tensorrt()  # fail before minutes of ONNX export
    if fusion_checkpoint is not None and not Path(fusion_checkpoint).is_file():
        # Say so before spending seconds on loading the encoders.
        raise CheckpointError(f"fusion checkpoint {fusion_checkpoint} does not exist: train one with "
                              "`xmsearch train CATALOG --out CKPT`")
    step(f"loading encoders: text {text_model}, image {image_model}")
    enc = Encoders.load(text_model, image_model, image_checkpoint)
    ckpt = load_fusion(enc, fusion_checkpoint, untrained)
    dims = enc.dims
    dims = S.Dims(dims.text_dim, dims.image_dim, dims.regions, dims.image_size,
                  ckpt.fusion.embed_dim, dims.max_length)
    specs = S.member_specs(dims)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out, target, "", trained=ckpt.trained, text_precision=text_precision,
                          fusion_precision=fusion_precision)
    int8_members = ({S.TEXT_ENCODER} if text_precision == "int8" else set()) | (
        set(FUSION_MEMBERS) if fusion_precision == "int8" else set())
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        stage = Path(tmp)
        for member, module, example, cases in _graphs(enc, ckpt.fusion, dims):
            step(f"exporting {member} to ONNX (opset {onnx_export.OPSET})")
            path = onnx_export.export_onnx(module, specs[member], example, stage / member / "1" / "model.onnx")
            reports = onnx_export.check_parity(module, specs[member], path, cases, min_cosine)
            if member in int8_members:
                reports += quantize_member(module, specs[member], path, cases, step)
            result.parity.extend(reports)
            for r in reports:
                step(f"  parity {r}")
        served = S.served_member_specs(dims, settings.text_queries)
        for member in (m for m in S.PREPROCESSING if m in served):
            d = stage / member / "1"
            d.mkdir(parents=True)
            if member in S.TEXT_ROLES:
                _write_text_preprocessing(d, enc)
            if member in S.IMAGE_READERS:
                (d / "image_preprocess.json").write_text(enc.image.preprocess.to_json())
        if settings.text_queries:
            _add_query_head(stage, enc)
        if target == "cpu":
            # Large weights (the text encoder's word embeddings) in a raw file beside the graph:
            # the member's instances map it instead of each holding a copy (shared_initializers).
            for member in NEURAL:
                if store_large_initializers_outside(stage / member / "1" / "model.onnx"):
                    step(f"  {member}: large initializers stored beside the graph, to be memory-mapped")
        result.fingerprint = fingerprint_of(stage, list(specs))
        step(f"model fingerprint {result.fingerprint}")
        if target == "tensorrt":
            result.engines = _build_engines(stage, specs, precision, step)
        configs = repository_configs(dims, settings, result.fingerprint)
        for name, cfg in configs.items():
            folder = stage / name
            write_config(cfg, folder)
            if cfg.backend == "python":
                (folder / "1").mkdir(parents=True, exist_ok=True)
                (folder / "1" / "model.py").write_text(shim_source(name))
            elif cfg.platform == "ensemble":
                (folder / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version folder
        (stage / "xmsearch_export.json").write_text(json.dumps({
            "target": target, "fingerprint": result.fingerprint, "text_model": text_model,
            "text_precision": text_precision, "fusion_precision": fusion_precision,
            "image_model": image_model, "trained": ckpt.trained, "fusion_meta": ckpt.meta,
            "dims": dims.__dict__, "parity": [r.__dict__ for r in result.parity]}, indent=2))
        _install(stage, out, list(configs))
    return result


def _add_query_head(stage: Path, enc: Encoders) -> None:
    """What the cpu target's text encoder member needs to answer query text itself
    (``xmsearch.triton_models.TextEncoderModel``): the tokenizer and its settings, and the
    ``fusion_text`` graph as ``query_head.onnx``, already checked (and quantized) above."""
    d = stage / S.TEXT_ENCODER / "1"
    _write_text_preprocessing(d, enc)
    shutil.copyfile(stage / S.FUSION_TEXT / "1" / "model.onnx", d / S.QUERY_HEAD_FILE)


def _write_text_preprocessing(folder: Path, enc: Encoders) -> None:
    """The files a member that tokenizes reads (``TextPreprocessor.from_dir``)."""
    shutil.copyfile(enc.text.tokenizer_json(), folder / "tokenizer.json")
    (folder / "text_preprocess.json").write_text(enc.text_pre.config.to_json())


def _build_engines(stage: Path, specs: dict[str, S.ModelSpec], precision: str, step) -> list:
    from xmsearch.export import tensorrt as trt_export

    infos = []
    for member in NEURAL:
        onnx_path = stage / member / "1" / "model.onnx"
        plan = onnx_path.with_name("model.plan")
        step(f"building TensorRT engine for {member} ({precision})")
        infos.append(trt_export.build_engine(onnx_path, plan, trt_export.profiles_for(specs[member]),
                                             precision=precision,
                                             timing_cache=stage.parent / ".trt_timing.cache"))
    return infos


# Every model an export may write; an earlier export's model that this one does not write is
# removed from the repository (the cpu target has no tokenizer_query, GPU targets have one).
EXPORTED_MODELS = frozenset(S.PREPROCESSING) | frozenset(NEURAL) | frozenset(S.ENSEMBLES)


def _install(stage: Path, out: Path, names: list[str]) -> None:
    """Move each staged member over its old folder (old one removed only once replaced),
    then remove the models of an earlier export that this one does not have: Triton would
    otherwise go on loading them, with their old settings and files."""
    for name in names + ["xmsearch_export.json"]:
        src, dst = stage / name, out / name
        if dst.exists():
            trash = out / f".old-{name}"
            if trash.exists():
                shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
            dst.rename(trash)
            src.rename(dst)
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        else:
            src.rename(dst)
    for name in sorted(EXPORTED_MODELS - set(names)):
        if (out / name / "config.pbtxt").is_file():
            shutil.rmtree(out / name)
