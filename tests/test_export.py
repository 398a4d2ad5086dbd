"""Export spine: generated configs, ONNX graphs, parity checks, checkpoints, fingerprints.

Config tests build every target's repository configs in memory (no GPU, no TensorRT
needed); the graph, regeneration and fingerprint tests read the session's exported cpu
repository (``exported_repository``); parity and checkpoint tests use a tiny fusion module
so that they run in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from xmsearch import spec as S
from xmsearch.checkpoint import FusionCheckpoint
from xmsearch.errors import CheckpointError, ConfigError, ModelError
from xmsearch.export import onnx as onnx_export
from xmsearch.export import tensorrt as trt_export
from xmsearch.export.pipeline import fingerprint_of, load_fusion, sample_images
from xmsearch.export.repository import (NEURAL, TARGETS, TargetSettings, check_configs, read_config,
                                        read_repository, repository_configs, to_text, write_config)
from xmsearch.models.fusion import AttentionFusion, FusionEntry

DIMS = S.Dims(384, 1800)
MEMBERS = tuple(S.member_specs(DIMS))
PREPROCESSING = S.PREPROCESSING
_ONNX_TO_TRITON = {onnx.TensorProto.INT64: mc.TYPE_INT64, onnx.TensorProto.FLOAT: mc.TYPE_FP32,
                   onnx.TensorProto.FLOAT16: mc.TYPE_FP16, onnx.TensorProto.UINT8: mc.TYPE_UINT8}


def configs_for(target: str) -> dict[str, mc.ModelConfig]:
    return repository_configs(DIMS, TargetSettings(target), "fp")


def served_members(settings: TargetSettings) -> tuple[str, ...]:
    """The members a target's repository serves (the cpu target has no tokenizer_query)."""
    return tuple(S.served_member_specs(DIMS, settings.text_queries))


def copy_of(configs: dict[str, mc.ModelConfig]) -> dict[str, mc.ModelConfig]:
    out = {}
    for name, cfg in configs.items():
        out[name] = mc.ModelConfig()
        out[name].CopyFrom(cfg)
    return out


def step_of(cfg: mc.ModelConfig, model: str):
    return next(s for s in cfg.ensemble_scheduling.step if s.model_name == model)


# ------------------------------------------------------------------ generated configs


@pytest.mark.parametrize("target", TARGETS)
def test_configs_round_trip_through_tritons_schema(target: str, tmp_path: Path) -> None:
    configs = configs_for(target)
    assert set(configs) == set(served_members(TargetSettings(target))) | set(S.ENSEMBLES)
    assert (S.TOKENIZER_QUERY in configs) == (target != "cpu")
    for name, cfg in configs.items():
        path = write_config(cfg, tmp_path / name)
        # Parsed by protobuf itself, not only by our reader.
        parsed = text_format.Parse(path.read_text(), mc.ModelConfig())
        assert parsed == cfg, name
        assert read_config(path) == cfg, name
    assert read_repository(tmp_path) == configs
    check_configs(read_repository(tmp_path))


def test_read_config_names_the_broken_file(tmp_path: Path) -> None:
    path = write_config(configs_for("cpu")[S.TEXT_ENCODER], tmp_path / S.TEXT_ENCODER)
    path.write_text(path.read_text().replace("max_batch_size", "max_batch_sise"))
    with pytest.raises(ConfigError, match=rf"{path}.*not a valid Triton model config"):
        read_config(path)


@pytest.mark.parametrize("target", TARGETS)
def test_members_have_backend_batching_and_instances(target: str) -> None:
    configs = configs_for(target)
    for name in served_members(TargetSettings(target)):
        cfg = configs[name]
        assert cfg.HasField("dynamic_batching"), name
        db = cfg.dynamic_batching
        assert list(db.preferred_batch_size), name
        assert all(1 <= b <= cfg.max_batch_size for b in db.preferred_batch_size), name
        # CPU members batch what queued while they were busy; GPU members wait to form one.
        if target == "cpu":
            assert db.max_queue_delay_microseconds == 0, name
        else:
            assert db.max_queue_delay_microseconds > 0, name
        assert len(cfg.instance_group) >= 1 and all(g.count >= 1 for g in cfg.instance_group), name
        if name in PREPROCESSING or target == "cpu":
            assert (cfg.backend, cfg.platform) == ("python", ""), name
            assert all(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in cfg.instance_group), name
        elif target == "onnxruntime":
            assert (cfg.backend, cfg.default_model_filename) == ("onnxruntime", "model.onnx"), name
        else:
            assert (cfg.platform, cfg.backend) == ("tensorrt_plan", ""), name
            assert cfg.default_model_filename == "model.plan"
        if target != "cpu" and name in NEURAL:
            assert all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group), name
    for name in S.ENSEMBLES:
        assert configs[name].platform == "ensemble"
        assert configs[name].max_batch_size == 32


def test_cpu_onnx_runtime_members_settings() -> None:
    cpu = configs_for("cpu")
    for name in NEURAL:
        params = cpu[name].parameters
        # The text encoder: two instances of one thread (its query_text is one step: see
        # TargetSettings.text_encoder_layout); the others one instance of the target's two.
        layout = (2, "1") if name == S.TEXT_ENCODER else (1, "2")
        assert (cpu[name].instance_group[0].count, params["intra_op_threads"].string_value) == layout, name
        assert params["allow_spinning"].string_value == "0", name
        assert params["force_spinning_stop"].string_value == "0", name
        # "single": an encoder's lone rows spin in a second session; the small fusion graphs have none
        lone_rows = "1" if name in (S.TEXT_ENCODER, S.IMAGE_ENCODER) else "0"
        assert params["spin_max_rows"].string_value == lone_rows, name
        assert params["spin_intra_op_threads"].string_value == ("2" if lone_rows == "1" else "0"), name
        # The image encoder's batches run 8 rows at a time (ONNX Runtime's arena stays small).
        assert params["max_rows_per_run"].string_value == ("8" if name == S.IMAGE_ENCODER else "0"), name
    for mode, switches in (("run", ("1", "1", "0")), ("always", ("1", "0", "0")), ("off", ("0", "0", "0"))):
        spinning = repository_configs(DIMS, TargetSettings("cpu", ort_spinning=mode, ort_threads=1), "fp")
        for name in NEURAL:
            params = spinning[name].parameters
            assert (params["allow_spinning"].string_value, params["force_spinning_stop"].string_value,
                    params["spin_max_rows"].string_value) == switches, (mode, name)
            assert params["spin_intra_op_threads"].string_value == "0", (mode, name)
        assert spinning[S.TEXT_ENCODER].parameters["intra_op_threads"].string_value == "1"
    with pytest.raises(ConfigError, match="ort_spinning must be one of off, run, always, single, got True"):
        TargetSettings("cpu", ort_spinning=True)
    whole = repository_configs(DIMS, TargetSettings("cpu", image_encoder_run_rows=0), "fp")
    assert whole[S.IMAGE_ENCODER].parameters["max_rows_per_run"].string_value == "0"
    with pytest.raises(ConfigError, match="image_encoder_run_rows must be a row count"):
        TargetSettings("cpu", image_encoder_run_rows=-8)
    # The text encoder's own layout (xmsearch export --text-encoder-layout): the cpu target only;
    # by default two instances of half the target's threads.
    eight = repository_configs(DIMS, TargetSettings("cpu", ort_threads=8), "fp")[S.TEXT_ENCODER]
    assert (eight.instance_group[0].count, eight.parameters["intra_op_threads"].string_value) == (2, "4")
    one = repository_configs(DIMS, TargetSettings("cpu", text_encoder_layout=(1, 2)), "fp")[S.TEXT_ENCODER]
    assert (one.instance_group[0].count, one.parameters["intra_op_threads"].string_value) == (1, "2")
    laid_out = repository_configs(DIMS, TargetSettings("cpu", text_encoder_layout=(3, 1)), "fp")
    assert laid_out[S.TEXT_ENCODER].instance_group[0].count == 3
    assert laid_out[S.TEXT_ENCODER].parameters["intra_op_threads"].string_value == "1"
    for name in set(NEURAL) - {S.TEXT_ENCODER}:
        assert laid_out[name].instance_group[0].count == 1, name
        assert laid_out[name].parameters["intra_op_threads"].string_value == "2", name
    # A lone query still runs on every core: the one-row session has the target's threads.
    assert laid_out[S.TEXT_ENCODER].parameters["spin_intra_op_threads"].string_value == "2"
    gpu = repository_configs(DIMS, TargetSettings("tensorrt", text_encoder_layout=(2, 1)), "fp")
    assert gpu[S.TEXT_ENCODER].instance_group[0].count == 1
    # The image encoder's (--image-encoder-layout), independent of the text encoder's.
    both = repository_configs(DIMS, TargetSettings("cpu", text_encoder_layout=(1, 1),
                                                   image_encoder_layout=(2, 1)), "fp")
    assert [(both[m].instance_group[0].count, both[m].parameters["intra_op_threads"].string_value)
            for m in (S.TEXT_ENCODER, S.IMAGE_ENCODER, S.FUSION_ITEM)] == [(1, "1"), (2, "1"), (1, "2")]
    gpu = repository_configs(DIMS, TargetSettings("onnxruntime", image_encoder_layout=(2, 1)), "fp")
    assert gpu[S.IMAGE_ENCODER].instance_group[0].count == 1
    assert gpu[S.IMAGE_ENCODER].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    # The queue delay: chosen for every member, or 0 whenever the members run on CPU.
    for settings, want in ((TargetSettings("cpu", queue_delay_us=250), 250),
                           (TargetSettings("onnxruntime", device="cpu"), 0),
                           (TargetSettings("tensorrt", queue_delay_us=0), 0)):
        configs = repository_configs(DIMS, settings, "fp")
        assert {configs[m].dynamic_batching.max_queue_delay_microseconds
                for m in served_members(settings)} == {want}, settings


def test_ensembles_expose_the_public_contract() -> None:
    configs = configs_for("cpu")
    wanted = {S.QUERY_TEXT: ["TEXT"], S.QUERY_IMAGE: ["IMAGE"],
              S.QUERY_TEXT_IMAGE: ["TEXT", "IMAGE"], S.ITEM: ["TEXT", "IMAGE"]}
    for name, inputs in wanted.items():
        cfg = configs[name]
        assert [i.name for i in cfg.input] == inputs, name
        assert all((i.data_type, list(i.dims)) == (mc.TYPE_STRING, [1]) for i in cfg.input), name
        # Catalogue items also return their photo-side vector (CatalogIndex.search_photo).
        outputs = ["EMBEDDING", "PHOTO_EMBEDDING"] if name == S.ITEM else ["EMBEDDING"]
        assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == \
            [(o, mc.TYPE_FP32, [256]) for o in outputs], name
        assert cfg.parameters[S.FINGERPRINT_PARAMETER].string_value == "fp"
    # A query runs only the branches it needs.
    steps = {n: [s.model_name for s in configs[n].ensemble_scheduling.step] for n in wanted}
    assert S.IMAGE_ENCODER not in steps[S.QUERY_TEXT]
    assert S.TEXT_ENCODER not in steps[S.QUERY_IMAGE]
    # Two-input ensembles read both inputs in one first step (a refusal must not leave a
    # sibling branch running: see xmsearch.spec.ensemble_specs), with the e5 role of the kind.
    assert steps[S.ITEM][0] == S.ITEM_PREPROCESS and steps[S.QUERY_TEXT_IMAGE][0] == S.JOINT_PREPROCESS
    for name in (S.ITEM, S.QUERY_TEXT_IMAGE):
        first = configs[name].ensemble_scheduling.step[0]
        assert set(first.input_map.values()) == {"TEXT", "IMAGE"}, name
        assert not set(steps[name][1:]) & set(PREPROCESSING), name
    assert configs[S.ITEM_PREPROCESS].parameters["role"].string_value == "passage"
    assert configs[S.JOINT_PREPROCESS].parameters["role"].string_value == "query"


@pytest.mark.parametrize("target", TARGETS)
def test_query_text_is_one_step_where_the_text_encoder_can_tokenize(target: str) -> None:
    """cpu: the python-backend text encoder reads query TEXT itself (TextEncoderModel); GPU
    targets' text encoder is a graph, so tokenizer -> text encoder -> fusion_text."""
    configs = configs_for(target)
    steps = [s.model_name for s in configs[S.QUERY_TEXT].ensemble_scheduling.step]
    encoder = configs[S.TEXT_ENCODER]
    inputs = {i.name: i.optional for i in encoder.input}
    outputs = [o.name for o in encoder.output]
    if target == "cpu":
        assert steps == [S.TEXT_ENCODER]
        assert S.TOKENIZER_QUERY not in configs  # nothing would run it (and an e5 tokenizer is ~270 MB)
        step = configs[S.QUERY_TEXT].ensemble_scheduling.step[0]
        assert (dict(step.input_map), dict(step.output_map)) == ({"TEXT": "TEXT"}, {"EMBEDDING": "EMBEDDING"})
        # Every input optional: item / query_text_image send ids and mask, query_text TEXT.
        assert inputs == {S.INPUT_IDS: True, S.ATTENTION_MASK: True, S.TEXT: True}
        assert outputs == [S.TOKEN_STATES, S.EMBEDDING]
        assert encoder.parameters["role"].string_value == "query"
        # The ensemble still requires its one input, and answers only the embedding.
        assert [(i.name, i.optional) for i in configs[S.QUERY_TEXT].input] == [("TEXT", False)]
        assert [o.name for o in configs[S.QUERY_TEXT].output] == ["EMBEDDING"]
    else:
        assert steps == [S.TOKENIZER_QUERY, S.TEXT_ENCODER, S.FUSION_TEXT]
        assert configs[S.TOKENIZER_QUERY].parameters["role"].string_value == "query"
        assert inputs == {S.INPUT_IDS: False, S.ATTENTION_MASK: False}
        assert outputs == [S.TOKEN_STATES]
    # The other text paths feed it ids and mask on every target.
    for name in (S.ITEM, S.QUERY_TEXT_IMAGE):
        assert set(step_of(configs[name], S.TEXT_ENCODER).input_map) == {S.INPUT_IDS, S.ATTENTION_MASK}


def _unknown_model(c: dict[str, mc.ModelConfig]) -> None:
    step_of(c[S.QUERY_IMAGE], S.FUSION_IMAGE).model_name = "fusion_nowhere"


def _never_produced(c: dict[str, mc.ModelConfig]) -> None:
    step_of(c[S.QUERY_IMAGE], S.FUSION_IMAGE).input_map[S.IMAGE_REGIONS] = "ghost_regions"


def _dtype_mismatch(c: dict[str, mc.ModelConfig]) -> None:
    c[S.TEXT_ENCODER].input[0].data_type = mc.TYPE_INT32


def _batch_above_member(c: dict[str, mc.ModelConfig]) -> None:
    c[S.QUERY_IMAGE].max_batch_size = 64  # image_encoder takes 32


def _output_not_produced(c: dict[str, mc.ModelConfig]) -> None:
    step_of(c[S.ITEM], S.FUSION_ITEM).output_map[S.EMBEDDING] = "other_embedding"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("breakage, message", [
    (_unknown_model, r"ensemble 'query_image': step model 'fusion_nowhere' is not in the repository"),
    (_never_produced, r"ensemble 'query_image': tensor 'ghost_regions' feeding fusion_image\.IMAGE_REGIONS "
                      r"is produced by no earlier step"),
    (_dtype_mismatch, r"'input_ids' is .*text_encoder\.INPUT_IDS wants"),
    (_batch_above_member, r"ensemble 'query_image': max_batch_size 64 exceeds image_encoder's 32"),
    (_output_not_produced, r"ensemble 'item': output 'EMBEDDING' is not produced"),
], ids=["unknown-step-model", "never-produced", "dtype-mismatch", "batch-above-member", "no-output"])
def test_check_configs_refuses_broken_wiring(target: str, breakage, message: str) -> None:
    good = configs_for(target)
    broken = copy_of(good)
    breakage(broken)
    with pytest.raises(ConfigError, match=message):
        check_configs(broken)
    check_configs(good)  # the copy did not alias the original


# ------------------------------------------------------------------- TensorRT profiles


def test_tensorrt_profiles_cover_every_preferred_batch_size() -> None:
    specs = S.member_specs(DIMS)
    for name in NEURAL:
        spec = specs[name]
        profile = trt_export.profiles_for(spec)
        assert set(profile.shapes) == {t.name for t in spec.inputs}, name
        lo, _, hi = profile.batch_range
        assert hi == spec.max_batch_size, name
        assert all(lo <= b <= hi for b in spec.preferred_batch_sizes), name
        for t in spec.inputs:
            shortest, _, longest = profile.shapes[t.name]
            for i, d in enumerate(t.dims, start=1):
                if d == -1:  # every sequence the tokenizer can produce fits the profile
                    assert shortest[i] <= 1 and longest[i] >= DIMS.max_length, (name, t.name)
                else:
                    assert shortest[i] == longest[i] == d, (name, t.name)
    for name in PREPROCESSING:  # BYTES inputs cannot become engines
        with pytest.raises(ConfigError, match="BYTES"):
            trt_export.profiles_for(specs[name])


def test_tensorrt_profiles_fit_the_exported_graphs(exported_repository: Path) -> None:
    dims = S.Dims(**json.loads((exported_repository / "xmsearch_export.json").read_text())["dims"])
    specs = S.member_specs(dims)
    for name in NEURAL:
        trt_export.check_profile_against_onnx(trt_export.profiles_for(specs[name]),
                                              exported_repository / name / "1" / "model.onnx")


# -------------------------------------------------------------- exported repository


def _graph_tensors(values, skip: set[str]) -> list[tuple[str, int, list]]:
    out = []
    for v in values:
        if v.name in skip:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in v.type.tensor_type.shape.dim]
        out.append((v.name, v.type.tensor_type.elem_type, dims))
    return out


def _config_tensors(items) -> list[tuple[str, int, list]]:
    return [(t.name, t.data_type, list(t.dims)) for t in items]


def test_image_encoder_takes_uint8_pixels_and_normalises_them_itself(exported_repository: Path,
                                                                   reference_pipeline) -> None:
    """PIXEL_VALUES is uint8 in the config and the graph, whose first step is the trunk's
    normalisation (v / 255 - mean) / std; a float32 tensor is refused by the graph."""
    import onnxruntime as ort

    cfg = read_config(exported_repository / S.IMAGE_ENCODER / "config.pbtxt")
    assert [(t.name, t.data_type) for t in cfg.input] == [(S.PIXEL_VALUES, mc.TYPE_UINT8)]
    enc = reference_pipeline.encoders
    px = np.stack([enc.image_pre(b) for b in sample_images(2)])
    assert px.dtype == np.uint8
    pre = enc.image.preprocess
    mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
    with torch.no_grad():
        normalised = enc.image.normalise(torch.from_numpy(px)).numpy()
        regions = enc.image(torch.from_numpy(px)).numpy()
        from_floats = enc.image(torch.from_numpy(px.astype(np.float32))).numpy()
    assert np.abs(normalised - (px.astype(np.float32) / 255.0 - mean) / std).max() < 1e-5
    assert np.array_equal(regions, from_floats)  # 0-255 floats: the same
    sess = ort.InferenceSession(str(exported_repository / S.IMAGE_ENCODER / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    assert np.abs(sess.run(None, {S.PIXEL_VALUES: px})[0] - regions).max() < 1e-3
    with pytest.raises(Exception, match="tensor\\(float\\)"):
        sess.run(None, {S.PIXEL_VALUES: px.astype(np.float32)})


@pytest.mark.parametrize("member", NEURAL)
def test_exported_graphs_match_their_configs(exported_repository: Path, member: str) -> None:
    cfg = read_config(exported_repository / member / "config.pbtxt")
    graph = onnx.load(str(exported_repository / member / "1" / "model.onnx"),
                      load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    graph_inputs, graph_outputs = _graph_tensors(graph.input, inits), _graph_tensors(graph.output, inits)
    head = exported_repository / member / "1" / S.QUERY_HEAD_FILE
    if member == S.TEXT_ENCODER and cfg.backend == "python":
        # The cpu target's member also reads TEXT (tokenized in its stub) and answers the
        # fusion_text graph's EMBEDDING, run on its states: that copy of fusion_text is beside it.
        head_graph = onnx.load(str(head), load_external_data=False).graph
        head_inputs = _graph_tensors(head_graph.input, {i.name for i in head_graph.initializer})
        assert [t[0] for t in head_inputs] == [S.TOKEN_STATES, S.ATTENTION_MASK]
        graph_outputs += _graph_tensors(head_graph.output, set())
        assert cfg.input[-1].name == S.TEXT and cfg.input[-1].data_type == mc.TYPE_STRING
        del cfg.input[-1]
    else:
        assert not head.exists()
    for side, got, cfg_values in (("input", graph_inputs, cfg.input), ("output", graph_outputs, cfg.output)):
        want = _config_tensors(cfg_values)
        assert [g[0] for g in got] == [w[0] for w in want], f"{member} {side} names"
        for (name, elem, gdims), (_, dtype, cdims) in zip(got, want):
            where = f"{member}.{name}"
            assert _ONNX_TO_TRITON[elem] == dtype, where
            assert len(gdims) == len(cdims) + 1, f"{where}: graph {gdims}, config {cdims}"
            assert isinstance(gdims[0], str), f"{where}: batch axis {gdims[0]} is not dynamic"
            for g, c in zip(gdims[1:], cdims):
                if c == -1:
                    assert isinstance(g, str), f"{where}: config says dynamic, graph says {gdims}"
                else:
                    assert g == c, f"{where}: graph {gdims}, config {cdims}"


def test_regenerated_configs_equal_the_files_on_disk(exported_repository: Path) -> None:
    meta = json.loads((exported_repository / "xmsearch_export.json").read_text())
    configs = repository_configs(S.Dims(**meta["dims"]), TargetSettings(meta["target"]),
                                 meta["fingerprint"])
    on_disk = {p.parent.name: p for p in exported_repository.glob("*/config.pbtxt")}
    assert set(on_disk) == set(configs)
    for name, cfg in configs.items():
        assert on_disk[name].read_text() == to_text(cfg), name


def test_fingerprint_is_on_every_ensemble_and_tracks_the_weights(
        exported_repository: Path, tmp_path: Path) -> None:
    meta = json.loads((exported_repository / "xmsearch_export.json").read_text())
    fp = fingerprint_of(exported_repository, list(MEMBERS))
    assert fp == meta["fingerprint"]
    assert fingerprint_of(exported_repository, list(MEMBERS)) == fp  # stable
    for name in S.ENSEMBLES:
        params = read_config(exported_repository / name / "config.pbtxt").parameters
        assert params[S.FINGERPRINT_PARAMETER].string_value == fp, name
        assert params[S.EMBED_DIM_PARAMETER].string_value == "256", name

    copy = tmp_path / "repo"
    shutil.copytree(exported_repository, copy)
    assert fingerprint_of(copy, list(MEMBERS)) == fp  # depends on content, not location
    for changed in (copy / S.FUSION_JOINT / "1" / "model.onnx",
                    copy / S.TEXT_ENCODER / "1" / "tokenizer.json",  # the cpu target's query tokenizer
                    copy / S.TEXT_ENCODER / "1" / "model.onnx.data"):  # weights beside the graph
        before = fingerprint_of(copy, list(MEMBERS))
        data = bytearray(changed.read_bytes())
        data[len(data) // 2] ^= 0x01
        changed.write_bytes(bytes(data))
        assert fingerprint_of(copy, list(MEMBERS)) != before, changed


# ---------------------------------------------------------------------- parity check


def tiny_fusion(seed: int = 0) -> AttentionFusion:
    torch.manual_seed(seed)
    return AttentionFusion(text_dim=8, image_dim=12, width=16, heads=2, embed_dim=8).eval()


def tiny_cases(seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for batch, length in ((3, 5), (1, 9)):
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[0, length - 2:] = 0  # padding in the first row
        cases.append((torch.randn(batch, length, 8, generator=g), mask,
                      torch.randn(batch, 4, 12, generator=g)))
    return cases


def test_check_parity_reports_per_output_figures(tmp_path: Path) -> None:
    fusion = tiny_fusion()
    spec = S.member_specs(S.Dims(8, 12, regions=4, embed_dim=8))[S.FUSION_JOINT]
    module = FusionEntry(fusion, "joint")
    cases = tiny_cases()
    path = onnx_export.export_onnx(module, spec, cases[0], tmp_path / "fusion_joint.onnx")

    reports = onnx_export.check_parity(module, spec, path, cases)
    assert [(r.model, r.output, r.cases) for r in reports] == [(S.FUSION_JOINT, S.EMBEDDING, 2)]
    assert reports[0].min_cosine >= 0.9999 and reports[0].max_abs_error < 1e-4

    with torch.no_grad():  # the module drifts away from the graph it was exported as
        for p in fusion.head.parameters():
            p.add_(torch.randn_like(p))
    with pytest.raises(ModelError) as info:
        onnx_export.check_parity(module, spec, path, cases)
    message = str(info.value)
    assert "ONNX parity check failed (need cosine >= 0.9999)" in message
    figures = r"fusion_joint\.EMBEDDING: max \|err\| (\S+), min cosine (\S+) over 2 cases"
    err, cos = (float(x) for x in re.search(figures, message).groups())
    assert err > 1e-3 and cos < 0.9999


def test_export_refuses_a_graph_that_contradicts_its_spec(tmp_path: Path) -> None:
    module = FusionEntry(tiny_fusion(), "joint")
    wrong = S.member_specs(S.Dims(8, 12, regions=4, embed_dim=9))[S.FUSION_JOINT]  # module gives 8
    with pytest.raises(ModelError, match=r"fusion_joint graph .* fails onnx.checker.*\(8\) vs \(9\)"):
        onnx_export.export_onnx(module, wrong, tiny_cases()[0], tmp_path / "fusion_joint.onnx")


# ------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    fusion = tiny_fusion()
    ckpt = FusionCheckpoint(fusion, "minilm-l6", "efficientnet-lite0", trained=True,
                            meta={"epochs": 3, "catalogue": "demo"})
    path = tmp_path / "sub" / "fusion.pt"
    ckpt.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["fusion.pt"]  # no temp file left

    back = FusionCheckpoint.load(path)
    assert (back.text_model, back.image_model, back.trained, back.meta) == \
        ("minilm-l6", "efficientnet-lite0", True, {"epochs": 3, "catalogue": "demo"})
    assert back.fusion.config() == fusion.config()
    assert not back.fusion.training
    states, mask, regions = tiny_cases()[0]
    with torch.no_grad():
        np.testing.assert_array_equal(back.fusion.encode_joint(states, mask, regions).numpy(),
                                      fusion.encode_joint(states, mask, regions).numpy())


def test_checkpoint_from_before_query_cross_loads_with_one_joint_path(tmp_path: Path) -> None:
    """Checkpoints written before ``query_cross`` existed have no such config key: they load
    as the shared-weights module, whose item and text+image graphs are one computation."""
    path = tmp_path / "fusion.pt"
    FusionCheckpoint(tiny_fusion(), "minilm-l6", "efficientnet-lite0", trained=True).save(path)
    payload = torch.load(str(path), weights_only=True)
    del payload["fusion_config"]["query_cross"]
    torch.save(payload, str(path))
    back = FusionCheckpoint.load(path).fusion
    assert back.config()["query_cross"] is False
    states, mask, regions = tiny_cases()[0]
    with torch.no_grad():
        assert torch.equal(FusionEntry(back, "item")(states, mask, regions)[0],
                           FusionEntry(back, "joint")(states, mask, regions))


def test_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fusion.pt"
    FusionCheckpoint(tiny_fusion(), "minilm-l6", "efficientnet-lite0", trained=True).save(path)
    payload = torch.load(str(path), weights_only=True)
    name = sorted(payload["state_dict"])[0]
    raw = payload["state_dict"][name].clone().contiguous()
    raw.view(torch.uint8).view(-1)[0] ^= 0x40  # flip one bit of one weight
    payload["state_dict"][name] = raw
    torch.save(payload, str(path))  # the recorded sha256 is the old one

    with pytest.raises(CheckpointError, match=rf"{path} fails its SHA-256 check"):
        FusionCheckpoint.load(path)


def test_damaged_or_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fusion.pt"
    FusionCheckpoint(tiny_fusion(), "minilm-l6", "efficientnet-lite0", trained=True).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{path} is unreadable"):
        FusionCheckpoint.load(path)
    with pytest.raises(CheckpointError, match="does not exist.*xmsearch train"):
        FusionCheckpoint.load(tmp_path / "nowhere.pt")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, str(other))
    with pytest.raises(CheckpointError, match="not an xmsearch fusion checkpoint"):
        FusionCheckpoint.load(other)


def test_checkpoint_for_other_encoders_is_refused(tmp_path: Path, reference_pipeline) -> None:
    enc = reference_pipeline.encoders
    d = enc.dims
    ckpt = FusionCheckpoint(AttentionFusion(d.text_dim, d.image_dim), "some-other-text-model",
                            enc.image_model, trained=True)
    with pytest.raises(CheckpointError, match=r"text model 'some-other-text-model' \(export uses"):
        ckpt.check_encoders(enc.text_model, d.text_dim, enc.image_model, d.image_dim)
    with pytest.raises(CheckpointError, match=r"dims text 8/image 12 \(encoders give 384/1800\)"):
        FusionCheckpoint(tiny_fusion(), enc.text_model, enc.image_model, True).check_encoders(
            enc.text_model, d.text_dim, enc.image_model, d.image_dim)

    # Through the export's own loader, from a file.
    path = tmp_path / "fusion.pt"
    ckpt.save(path)
    with pytest.raises(CheckpointError, match=rf"fusion {path} was trained on text model"):
        load_fusion(enc, path, untrained=False)
    FusionCheckpoint(AttentionFusion(d.text_dim, d.image_dim), enc.text_model, enc.image_model,
                     trained=True).save(path)
    assert load_fusion(enc, path, untrained=False).trained


def test_export_needs_trained_weights_or_an_explicit_untrained(reference_pipeline) -> None:
    enc = reference_pipeline.encoders
    with pytest.raises(CheckpointError,
                       match=r"needs trained fusion weights: pass --fusion CKPT.*--untrained"):
        load_fusion(enc, None, untrained=False)
    with pytest.raises(CheckpointError, match="not both"):
        load_fusion(enc, Path("fusion.pt"), untrained=True)
    untrained = load_fusion(enc, None, untrained=True)
    assert not untrained.trained
    # The layout training gives, stored-item mix included (the served fusion_item graph).
    from xmsearch.train import TrainConfig

    assert untrained.fusion.item_mix == TrainConfig.item_mix > 0 and untrained.fusion.query_cross
    # Its width and frozen region reduction too: the benchmarks time the graphs `make demo` serves.
    assert (untrained.fusion.width, untrained.fusion.image_reduce_dim) == (TrainConfig.width, TrainConfig.image_reduce_dim)
    assert not any(p.requires_grad for p in untrained.fusion.image_reduce.parameters())
    # Seeded: two untrained exports give the same function (what the serving tests rely on).
    again = load_fusion(enc, None, untrained=True)
    for (k, a), (_, b) in zip(untrained.fusion.state_dict().items(), again.fusion.state_dict().items()):
        assert torch.equal(a, b), k


def test_served_onnx_members_pass_their_spinning_switches_to_onnx_runtime() -> None:
    from xmsearch.triton_models import session_options

    def entry(opts, key):
        return opts.get_session_config_entry(key)

    opts = session_options("text_encoder", {"intra_op_threads": "2", "allow_spinning": "1",
                                            "force_spinning_stop": "1"})
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert entry(opts, "session.intra_op.allow_spinning") == "1"
    assert entry(opts, "session.force_spinning_stop") == "1"
    assert entry(session_options("m", {"allow_spinning": "0"}), "session.intra_op.allow_spinning") == "0"
    bare = session_options("m", {})  # a hand-written config without them: ONNX Runtime's defaults
    assert bare.intra_op_num_threads == 0
    for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
        with pytest.raises(RuntimeError, match=key.rsplit(".", 1)[1]):
            entry(bare, key)
    for params, says in (({"allow_spinning": "yes"}, "parameter allow_spinning must be 0 or 1, got 'yes'"),
                         ({"force_spinning_stop": "2"}, "parameter force_spinning_stop must be 0 or 1"),
                         ({"intra_op_threads": "-1"}, "intra_op_threads must be a count")):
        with pytest.raises(ValueError, match=says):
            session_options("fusion_text", params)


def _matmul_model(path: Path, rows: int, cols: int) -> np.ndarray:
    """y = x @ W with W [rows, cols] stored as an initializer; returns W."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm", [x], [y],
                              initializer=[numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return weight


def test_shared_initializers_feed_several_sessions_the_same_weights(tmp_path: Path) -> None:
    import onnxruntime as ort

    from xmsearch.onnxrt import SHARE_MIN_BYTES, cpu_session_options, shared_initializers

    path = tmp_path / "mm.onnx"
    weight = _matmul_model(path, 1024, SHARE_MIN_BYTES // 4 // 1024)  # exactly SHARE_MIN_BYTES
    shared = shared_initializers(path)
    assert list(shared) == ["W"] and shared["W"].shape() == list(weight.shape)
    assert shared_initializers(path, min_bytes=SHARE_MIN_BYTES + 1) == {}
    x = np.random.default_rng(1).standard_normal((3, 1024)).astype(np.float32)
    answers = []
    for spin in ("0", "1"):
        opts = cpu_session_options(1, allow_spinning=spin)
        opts.add_initializer("W", shared["W"])
        answers.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    for got in answers:
        np.testing.assert_allclose(got, x @ weight, rtol=1e-4, atol=1e-3)


def test_large_initializers_stored_beside_the_graph_are_mapped_not_copied(tmp_path: Path) -> None:
    """The cpu target keeps weights of at least SHARE_MIN_BYTES in ``model.onnx.data``;
    ``shared_initializers`` maps that file read-only (every instance of a member shares the
    pages) and the sessions fed from it answer as the graph with the weights inside."""
    import onnxruntime as ort

    from xmsearch.onnxrt import (SHARE_MIN_BYTES, cpu_session_options, external_data_file, shared_initializers,
                                 store_large_initializers_outside)

    small = tmp_path / "small.onnx"
    _matmul_model(small, 64, 64)
    assert not store_large_initializers_outside(small) and not external_data_file(small).exists()
    path = tmp_path / "mm.onnx"
    weight = _matmul_model(path, 1024, SHARE_MIN_BYTES // 4 // 1024)
    x = np.random.default_rng(1).standard_normal((3, 1024)).astype(np.float32)
    inside = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert store_large_initializers_outside(path)
    data = external_data_file(path)
    assert data.stat().st_size == weight.nbytes and path.stat().st_size < 4096
    assert data.stat().st_mode & 0o777 == path.stat().st_mode & 0o777  # readable as the graph is
    assert store_large_initializers_outside(path)  # again: rewritten, not appended to
    assert data.stat().st_size == weight.nbytes
    shared = shared_initializers(path, min_bytes=1 << 40)  # mapped whatever the size bound
    assert list(shared) == ["W"]
    opts = cpu_session_options(1)
    opts.add_initializer("W", shared["W"])
    np.testing.assert_array_equal(
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0], inside)
    # ONNX Runtime alone (the in-process baselines, the export checks) finds the file too.
    np.testing.assert_array_equal(
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0], inside)


def test_cpu_repository_maps_the_text_encoders_embeddings(exported_repository: Path) -> None:
    from xmsearch.onnxrt import external_data_file, shared_initializers

    graph = exported_repository / S.TEXT_ENCODER / "1" / "model.onnx"
    assert external_data_file(graph).stat().st_size > graph.stat().st_size  # the word embeddings
    external = [i.name for i in onnx.load(str(graph), load_external_data=False).graph.initializer
                if i.data_location == onnx.TensorProto.EXTERNAL]
    assert external and set(external) <= set(shared_initializers(graph))
    for member in set(NEURAL) - {S.TEXT_ENCODER}:  # nothing that large elsewhere
        assert not external_data_file(exported_repository / member / "1" / "model.onnx").exists(), member


def test_onnx_member_runs_lone_rows_in_a_spinning_session(tmp_path: Path, monkeypatch) -> None:
    """``OnnxModel`` with ``spin_max_rows``: batches up to that many rows go to a second session
    that spins inside its runs, sharing the large weights; without it there is one session."""
    from types import SimpleNamespace

    from xmsearch import triton_models
    from xmsearch.onnxrt import SHARE_MIN_BYTES

    monkeypatch.setattr(triton_models, "_pb", lambda: SimpleNamespace())  # only Triton's stub has it
    (tmp_path / "1").mkdir()
    weight = _matmul_model(tmp_path / "1" / "model.onnx", 1024, SHARE_MIN_BYTES // 4 // 1024)

    def member(**params: str) -> triton_models.OnnxModel:
        config = {"input": [{"name": "x", "data_type": "TYPE_FP32"}], "output": [{"name": "y"}],
                  "parameters": {k: {"string_value": v} for k, v in params.items()}}
        model = triton_models.OnnxModel()
        model.initialize({"model_config": json.dumps(config), "model_name": "fusion_text",
                          "model_repository": str(tmp_path), "model_version": "1"})
        return model

    def spinning(session) -> tuple[str, str]:
        opts = session.get_session_options()
        return tuple(opts.get_session_config_entry(k) for k in
                     ("session.intra_op.allow_spinning", "session.force_spinning_stop"))

    lone = member(intra_op_threads="2", allow_spinning="0", force_spinning_stop="0", spin_max_rows="2")
    assert lone.session is not lone.lone_session
    assert spinning(lone.session) == ("0", "0") and spinning(lone.lone_session) == ("1", "1")
    assert lone.lone_session.get_session_options().intra_op_num_threads == 2
    assert [lone.session_for(n) is lone.lone_session for n in (1, 2, 3, 8)] == [True, True, False, False]
    assert list(lone.shared) == ["W"]
    x = np.random.default_rng(2).standard_normal((2, 1024)).astype(np.float32)
    np.testing.assert_allclose(lone.session.run(None, {"x": x})[0], lone.lone_session.run(None, {"x": x})[0], rtol=1e-6)

    # Single-threaded instances with a two-thread one-row session (an encoder layout such as 2x1).
    wide = member(intra_op_threads="1", spin_max_rows="1", spin_intra_op_threads="2")
    assert wide.session.get_session_options().intra_op_num_threads == 1
    assert wide.lone_session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(ValueError, match="fusion_text: parameter spin_intra_op_threads must be a count"):
        member(spin_max_rows="1", spin_intra_op_threads="all")

    # max_rows_per_run: a merged batch over the limit runs in nearly equal parts, same answer.
    chunked = member(intra_op_threads="1", max_rows_per_run="3")
    calls = []
    real_run = chunked.session.run
    monkeypatch.setattr(chunked.session, "run", lambda names, feed: calls.append(len(feed["x"])) or real_run(names, feed),
                        raising=False)
    x8 = np.random.default_rng(3).standard_normal((8, 1024)).astype(np.float32)
    np.testing.assert_allclose(chunked.run({"x": x8})[0], x8 @ weight, rtol=1e-4, atol=1e-3)
    assert calls == [3, 2, 3]
    calls.clear()
    chunked.run({"x": x8[:3]})
    assert calls == [3]
    with pytest.raises(ValueError, match="fusion_text: parameter max_rows_per_run must be a row count"):
        member(max_rows_per_run="-1")

    plain = member(intra_op_threads="1", allow_spinning="0")
    assert plain.spin_max_rows == 0 and plain.session is plain.lone_session and plain.shared == {}
    assert all(plain.session_for(n) is plain.session for n in (1, 8))
    with pytest.raises(ValueError, match="fusion_text: parameter spin_max_rows must be a row count"):
        member(spin_max_rows="one")


def test_onnx_session_can_keep_idle_threads_from_spinning(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from xmsearch.export.onnx import onnx_session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "id.onnx"
    onnx.save(model, str(path))
    quiet = onnx_session(path, spinning=False)
    assert quiet.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert quiet.run(None, {"x": np.array([2.5], dtype=np.float32)})[0].tolist() == [2.5]
    default = onnx_session(path).get_session_options()
    with pytest.raises(RuntimeError, match="allow_spinning"):  # not set: ONNX Runtime's own default
        default.get_session_config_entry("session.intra_op.allow_spinning")


def test_install_replaces_members_and_drops_the_ones_an_earlier_export_had(tmp_path: Path) -> None:
    """Exporting the cpu target over a GPU target's repository (or over one exported before
    the cpu target lost tokenizer_query) must not leave that member behind: Triton would load
    it with its old files. Folders that are not xmsearch models stay."""
    from xmsearch.export.pipeline import _install

    out, stage = tmp_path / "repo", tmp_path / "stage"
    for folder, name in ((out, S.TOKENIZER_QUERY), (out, S.TEXT_ENCODER), (out, "my_model"),
                         (stage, S.TEXT_ENCODER)):
        (folder / name / "1").mkdir(parents=True)
        (folder / name / "config.pbtxt").write_text(f'name: "{name}"  # {folder.name}')
    (stage / "xmsearch_export.json").write_text("{}")
    _install(stage, out, [S.TEXT_ENCODER])
    assert sorted(p.name for p in out.iterdir()) == sorted([S.TEXT_ENCODER, "my_model", "xmsearch_export.json"])
    assert (out / S.TEXT_ENCODER / "config.pbtxt").read_text().endswith("# stage")
