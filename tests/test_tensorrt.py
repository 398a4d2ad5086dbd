"""TensorRT target: profiles, compatibility, gates (CPU) and engine builds (GPU only).

The pure parts -- optimisation profiles from the model specs, the sidecar and the
compatibility verdict, the parity and retrieval gates -- run everywhere.  Building and
running engines needs an NVIDIA GPU with TensorRT: those tests carry ``@pytest.mark.gpu``
and are skipped with the reason where either is missing.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from xmsearch.errors import ConfigError, InputError, ModelError
from xmsearch.export import tensorrt as xtrt
from xmsearch.export.tensorrt import (
    EngineInfo, HostEnvironment, Profile, assert_parity, check_engine_compat,
    check_profile_against_onnx, compare_outputs, compat_problems, gate_on_retrieval,
    profile_problems, profiles_for, read_engine_info, require_tensorrt, write_engine_info)
from xmsearch.spec import (FUSION_JOINT, IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER_QUERY, Dims,
                           ModelSpec, TensorSpec, member_specs)


def _gpu_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or OSError when CUDA libraries are missing
        return f"needs TensorRT (pip install 'xmsearch[gpu]'): import tensorrt failed: {e}"
    import torch

    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU: torch.cuda.is_available() is False"
    return None


GPU_SKIP = _gpu_skip_reason()

SPECS = member_specs(Dims(text_dim=384, image_dim=1800))


# --------------------------------------------------------------------------- profiles


def test_text_encoder_profile_uses_largest_preferred_batch_and_sequence_axes():
    spec = SPECS[TEXT_ENCODER]
    p = profiles_for(spec)
    assert set(p.shapes) == {t.name for t in spec.inputs}
    for name in p.shapes:
        assert p.min(name) == (1, spec.min_axis["sequence"])
        assert p.opt(name) == (max(spec.preferred_batch_sizes), spec.opt_axis["sequence"])
        assert p.max(name) == (spec.max_batch_size, spec.max_axis["sequence"])


def test_image_encoder_profile_keeps_fixed_dims():
    spec = SPECS[IMAGE_ENCODER]
    (pixels,) = spec.inputs
    p = profiles_for(spec)
    assert p.shapes[pixels.name] == (
        (1, *pixels.dims), (max(spec.preferred_batch_sizes), *pixels.dims),
        (spec.max_batch_size, *pixels.dims))


def test_fusion_profile_mixes_dynamic_and_fixed_inputs():
    spec = SPECS[FUSION_JOINT]
    p = profiles_for(spec)
    for t in spec.inputs:
        lo, opt, hi = p.shapes[t.name]
        assert len(lo) == len(t.dims) + 1
        for i, d in enumerate(t.dims, start=1):
            if d == -1:
                assert (lo[i], opt[i], hi[i]) == (spec.min_axis["sequence"],
                                                   spec.opt_axis["sequence"],
                                                   spec.max_axis["sequence"])
            else:
                assert lo[i] == opt[i] == hi[i] == d


@pytest.mark.parametrize("name", [n for n, s in SPECS.items()
                                  if all(t.dtype != "object" for t in s.inputs)])
def test_every_tensor_member_profile_covers_every_preferred_batch(name):
    spec = SPECS[name]
    lo, opt, hi = profiles_for(spec).batch_range
    assert lo == 1 and hi == spec.max_batch_size
    assert opt == max(spec.preferred_batch_sizes)
    assert all(lo <= b <= hi for b in spec.preferred_batch_sizes)


def test_profile_without_preferred_sizes_optimises_for_max_batch():
    spec = ModelSpec("m", (TensorSpec("X", "float32", (4,)),), (), max_batch_size=16)
    assert profiles_for(spec).batch_range == (1, 16, 16)


def test_profile_defaults_min_to_one_and_opt_to_max():
    spec = ModelSpec("m", (TensorSpec("X", "int64", (-1,), ("sequence",)),), (), 8, (4,),
                     max_axis={"sequence": 128})
    assert profiles_for(spec).shapes["X"] == ((1, 1), (4, 128), (8, 128))


@pytest.mark.parametrize("spec, words", [
    (ModelSpec("m", (TensorSpec("X", "int64", (-1,), ("sequence",)),), (), 8),
     ["m.X", "sequence", "max_axis"]),
    (ModelSpec("m", (TensorSpec("X", "float32", (4,)),), (), 8, (4, 16)),
     ["[16]", "max_batch_size (8)"]),
    (ModelSpec("m", (TensorSpec("X", "float32", (4,)),), (), 0), ["max_batch_size 0"]),
    (ModelSpec("m", (TensorSpec("X", "int64", (-1,)),), (), 8, max_axis={"s": 4}),
     ["axis names"]),
    (ModelSpec("m", (TensorSpec("X", "int64", (-1,), ("s",)),), (), 8,
               min_axis={"s": 9}, max_axis={"s": 4}), ["m:", "min <= opt <= max"]),
])
def test_profiles_for_refuses_inconsistent_specs(spec, words):
    with pytest.raises(ConfigError) as e:
        profiles_for(spec)
    for w in words:
        assert w in str(e.value)


def test_bytes_inputs_are_not_tensorrt_material():
    with pytest.raises(ConfigError, match="BYTES"):
        profiles_for(SPECS[TOKENIZER_QUERY])


def test_profile_json_round_trip_and_validation():
    p = profiles_for(SPECS[FUSION_JOINT])
    assert Profile.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(ConfigError, match="rank"):
        Profile({"X": ((1, 2), (1, 2, 3), (1, 2))})
    with pytest.raises(ConfigError, match="positive"):
        Profile({"X": ((1, -1), (1, 2), (1, 2))})


def _tiny_onnx(path: Path, seq_dim: str | int = "sequence", width: int = 8) -> Path:
    """A real two-input ONNX graph (MatMul + Add) written with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", seq_dim, width])
    m = helper.make_tensor_value_info("MASK", TensorProto.FLOAT, ["batch", seq_dim, 1])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", seq_dim, 4])
    w = numpy_helper.from_array(np.ones((width, 4), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "MASK"], ["Y"])],
        "tiny", [x, m], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_profile_checked_against_the_onnx_graph(tmp_path):
    onnx_path = _tiny_onnx(tmp_path / "tiny.onnx")
    good = Profile({"X": ((1, 1, 8), (4, 16, 8), (8, 32, 8)),
                    "MASK": ((1, 1, 1), (4, 16, 1), (8, 32, 1))})
    check_profile_against_onnx(good, onnx_path)

    wrong_width = Profile({"X": ((1, 1, 16), (4, 16, 16), (8, 32, 16)), "MASK": good.shapes["MASK"]})
    with pytest.raises(ModelError, match=r"X: min shape \(1, 1, 16\) differs .* at axis \[2\]"):
        check_profile_against_onnx(wrong_width, onnx_path)
    only_x = Profile({"X": good.shapes["X"]})
    with pytest.raises(ModelError, match=r"\['MASK'\] have no profile"):
        check_profile_against_onnx(only_x, onnx_path)


def test_profile_problems_lists_rank_and_unknown_names():
    p = Profile({"X": ((1, 4), (2, 4), (4, 4)), "Z": ((1,), (1,), (1,))})
    problems = profile_problems(p, {"X": (-1, 4, 3)})
    assert any("rank" in s for s in problems)
    assert any("'Z'" in s for s in problems)
    assert profile_problems(Profile({"X": ((1, 4), (2, 4), (4, 4))}), {"X": (-1, 4)}) == []


def test_unreadable_onnx_names_the_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 3)
    with pytest.raises(ModelError, match="broken.onnx"):
        check_profile_against_onnx(Profile({"X": ((1,), (1,), (1,))}), bad)


# --------------------------------------------------------------------------- sidecar & compat

BUILT = HostEnvironment("10.5.0", "NVIDIA A10G", "8.6")


def _info(tmp_path: Path, **kw) -> EngineInfo:
    base = EngineInfo(
        plan_path=str(tmp_path / "model.plan"), precision="fp16",
        profile=profiles_for(SPECS[TEXT_ENCODER]), tensorrt_version=BUILT.tensorrt_version,
        gpu_name=BUILT.gpu_name, compute_capability=BUILT.compute_capability,
        onnx_path="model.onnx", onnx_sha256="ab" * 32, plan_bytes=123)
    return replace(base, **kw)


def test_compat_same_host_is_fine_and_build_suffix_is_ignored():
    assert compat_problems(BUILT, BUILT) == []
    assert compat_problems(BUILT, replace(BUILT, tensorrt_version="10.5.0.18")) == []


@pytest.mark.parametrize("host, fragment", [
    (replace(BUILT, tensorrt_version="10.7.0.23"), "TensorRT 10.5.0 != 10.7.0.23"),
    (replace(BUILT, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0"),
     "compute capability 8.6 != 9.0"),
    (replace(BUILT, gpu_name="NVIDIA RTX A6000"), "GPU model"),
])
def test_compat_refuses_other_tensorrt_or_gpu(host, fragment):
    problems = compat_problems(BUILT, host)
    assert len(problems) == 1 and fragment in problems[0]


def test_compat_other_model_same_capability_can_be_allowed():
    host = replace(BUILT, gpu_name="NVIDIA RTX A6000")
    assert compat_problems(BUILT, host, allow_other_gpu_model=True) == []


def test_sidecar_round_trip_and_check_engine_compat_message(tmp_path):
    info = _info(tmp_path)
    path = write_engine_info(info)
    assert path == tmp_path / "model.plan.json"
    assert read_engine_info(info.plan_path) == info
    assert check_engine_compat(info.plan_path, host=BUILT) == info

    host = HostEnvironment("10.7.0", "NVIDIA L4", "8.9")
    with pytest.raises(ModelError) as e:
        check_engine_compat(info.plan_path, host=host)
    msg = str(e.value)
    assert "engine built with TensorRT 10.5.0 on GPU NVIDIA A10G" in msg
    assert "this host has TensorRT 10.7.0 on GPU NVIDIA L4" in msg
    assert msg.endswith("rebuild with `xmsearch export --target tensorrt`")


def test_missing_or_truncated_sidecar_is_a_readable_error(tmp_path):
    plan = tmp_path / "model.plan"
    with pytest.raises(ModelError, match="model.plan.json is missing"):
        read_engine_info(plan)
    path = write_engine_info(_info(tmp_path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ModelError, match="corrupt or truncated.*rebuild"):
        check_engine_compat(plan, host=BUILT)


def test_serving_image_tensorrt_must_match_the_builder():
    assert xtrt.serving_tensorrt_problems(xtrt.TRITON_RELEASES[xtrt.TRITON_IMAGE_TAG].tensorrt) == []
    (problem,) = xtrt.serving_tensorrt_problems("11.4.0")
    assert "tensorrt-cu12==10.5.0" in problem


# --------------------------------------------------------------------------- gates


def test_retrieval_gate_passes_small_drops_and_improvements():
    fp32 = {"recall@10": 0.812, "ndcg@10": 0.640}
    drops = gate_on_retrieval(fp32, {"recall@10": 0.805, "ndcg@10": 0.650})
    assert drops["recall@10"] == pytest.approx(0.007)
    assert drops["ndcg@10"] == pytest.approx(-0.010)
    # Exactly one point is allowed despite 0.80 - 0.79 > 0.01 in floating point.
    gate_on_retrieval({"recall@10": 0.80, "ndcg@10": 0.6}, {"recall@10": 0.79, "ndcg@10": 0.6})


def test_retrieval_gate_refuses_a_drop_over_one_point():
    with pytest.raises(ModelError) as e:
        gate_on_retrieval({"recall@10": 0.80, "ndcg@10": 0.60},
                          {"recall@10": 0.80, "ndcg@10": 0.585}, precision="int8")
    msg = str(e.value)
    assert "int8" in msg and "ndcg@10 0.6000 -> 0.5850" in msg and "recall@10" not in msg


def test_retrieval_gate_needs_both_metrics():
    with pytest.raises(InputError, match="ndcg@10"):
        gate_on_retrieval({"recall@10": 0.8}, {"recall@10": 0.8, "ndcg@10": 0.6})


def test_compare_outputs_and_parity_gate():
    rng = np.random.default_rng(0)
    ref = {"EMBEDDING": rng.normal(size=(4, 16)).astype(np.float32)}
    same = compare_outputs(ref, {"EMBEDDING": ref["EMBEDDING"].copy()})
    assert same["EMBEDDING"]["max_abs_diff"] == 0.0
    assert same["EMBEDDING"]["min_cosine"] == pytest.approx(1.0)
    assert_parity(same, 0.999)

    noisy = ref["EMBEDDING"].copy()
    noisy[2] = rng.normal(size=16)  # one row replaced: its cosine collapses
    report = compare_outputs(ref, {"EMBEDDING": noisy})
    assert report["EMBEDDING"]["min_cosine"] < 0.9
    with pytest.raises(ModelError, match=r"EMBEDDING: max \|diff\| .*min cosine"):
        assert_parity(report, 0.999)


def test_parity_gate_fails_on_nan_missing_or_reshaped_outputs():
    ref = {"A": np.ones((2, 3)), "B": np.ones((2, 3))}
    report = compare_outputs(ref, {"A": np.full((2, 3), np.nan), "B": np.ones((3, 2))})
    with pytest.raises(ModelError) as e:
        assert_parity(report, 0.5)
    assert "'A'" in str(e.value) and "shape (3, 2) != reference (2, 3)" in str(e.value)
    with pytest.raises(ModelError, match="missing"):
        assert_parity(compare_outputs(ref, {"A": ref["A"]}), 0.5)


# --------------------------------------------------------------------------- no-GPU behaviour


@pytest.mark.skipif(GPU_SKIP is None, reason="this host has TensorRT and a GPU")
def test_require_tensorrt_explains_how_to_get_it():
    with pytest.raises(ModelError) as e:
        require_tensorrt()
    assert str(e.value).startswith(
        "the tensorrt target needs an NVIDIA GPU with TensorRT: install the gpu extra "
        "(pip install 'xmsearch[gpu]') on a GPU host, or use --target cpu / onnxruntime")


@pytest.mark.skipif(GPU_SKIP is None, reason="this host has TensorRT and a GPU")
def test_build_engine_without_gpu_fails_before_writing(tmp_path):
    onnx_path = _tiny_onnx(tmp_path / "tiny.onnx")
    plan = tmp_path / "model.plan"
    profile = Profile({"X": ((1, 1, 8), (2, 4, 8), (4, 8, 8)), "MASK": ((1, 1, 1), (2, 4, 1), (4, 8, 1))})
    with pytest.raises(ModelError, match="pip install 'xmsearch\\[gpu\\]'"):
        xtrt.build_engine(onnx_path, plan, profile)
    assert not plan.exists() and not xtrt.sidecar_path(plan).exists()


def test_build_engine_validates_arguments_first(tmp_path):
    profile = Profile({"X": ((1,), (1,), (1,))})
    with pytest.raises(InputError, match="precision 'int4'"):
        xtrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", profile, precision="int4")
    with pytest.raises(InputError, match="int8 needs calibration data"):
        xtrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", profile, precision="int8",
                          calibration_cache=tmp_path / "absent.cache")


def test_calibration_batches_must_share_one_shape():
    names = ["X"]
    ok = [{"X": np.zeros((4, 8), np.float32)}] * 2
    assert xtrt._calibration_shapes(ok, names) == {"X": (4, 8)}
    with pytest.raises(InputError, match="batch 1: X shape"):
        xtrt._calibration_shapes([{"X": np.zeros((4, 8))}, {"X": np.zeros((4, 9))}], names)
    with pytest.raises(InputError, match="a bare array"):
        xtrt._normalise_batches([np.zeros((4, 8))], ["X", "MASK"])


def test_calibration_shapes_must_be_the_profile_opt_shapes():
    p = profiles_for(SPECS[TEXT_ENCODER])
    opt = {n: p.opt(n) for n in p.shapes}
    assert xtrt.calibration_shape_problems(p, opt) == []
    (problem,) = xtrt.calibration_shape_problems(p, {**opt, "INPUT_IDS": (8, 16)})
    assert f"INPUT_IDS calibration shape (8, 16) != opt {opt['INPUT_IDS']}" == problem


# --------------------------------------------------------------------------- GPU only

TINY_SPEC = ModelSpec(
    "tiny", (TensorSpec("X", "float32", (-1, 8), ("sequence",)),),
    (TensorSpec("Y", "float32", (-1, 4), ("sequence",)),), max_batch_size=8,
    preferred_batch_sizes=(2, 4), min_axis={"sequence": 1}, opt_axis={"sequence": 16},
    max_axis={"sequence": 32})


@pytest.fixture(scope="module")
def tiny_torch_onnx(tmp_path_factory) -> Path:
    """A small MLP exported with torch, dynamic batch and sequence axes."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(),
                                torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)).eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 5, 8),), str(path), input_names=["X"],
                          output_names=["Y"], opset_version=17, dynamo=False,
                          dynamic_axes={"X": {0: "batch", 1: "sequence"},
                                        "Y": {0: "batch", 1: "sequence"}})
    return path


def _feeds(batch: int, seq: int, seed: int = 1) -> dict[str, np.ndarray]:
    return {"X": np.random.default_rng(seed).normal(size=(batch, seq, 8)).astype(np.float32)}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
class TestEngineOnGpu:
    """Real engine builds: an NVIDIA GPU and TensorRT only."""

    @pytest.mark.parametrize("precision, min_cosine", [("fp32", 0.99999), ("fp16", 0.999)])
    def test_engine_matches_onnxruntime(self, tiny_torch_onnx, tmp_path, precision, min_cosine):
        plan = tmp_path / "model.plan"
        info = xtrt.build_engine(tiny_torch_onnx, plan, profiles_for(TINY_SPEC),
                                 precision=precision, workspace_gib=1)
        assert plan.stat().st_size == info.plan_bytes > 0
        side = json.loads(xtrt.sidecar_path(plan).read_text())
        assert side["precision"] == precision
        assert side["onnx_sha256"] == xtrt.file_sha256(tiny_torch_onnx)
        assert side["profile"]["X"]["opt"] == [4, 16, 8]
        check_engine_compat(plan)
        for batch, seq in [(1, 1), (3, 7), (8, 32)]:
            report = xtrt.check_engine_parity(plan, tiny_torch_onnx, _feeds(batch, seq), min_cosine)
            assert report["Y"]["min_cosine"] >= min_cosine

    def test_engine_refuses_shapes_outside_profile(self, tiny_torch_onnx, tmp_path):
        plan = tmp_path / "model.plan"
        xtrt.build_engine(tiny_torch_onnx, plan, profiles_for(TINY_SPEC), precision="fp32",
                          workspace_gib=1)
        with pytest.raises(InputError, match="outside the profile"):
            xtrt.run_engine(plan, _feeds(9, 4))
        with pytest.raises(InputError, match="missing"):
            xtrt.run_engine(plan, {})

    def test_timing_cache_written_then_reused(self, tiny_torch_onnx, tmp_path):
        cache = tmp_path / "timing.cache"
        first = xtrt.build_engine(tiny_torch_onnx, tmp_path / "a.plan", profiles_for(TINY_SPEC),
                                  precision="fp16", timing_cache=cache, workspace_gib=1)
        assert first.timing_cache_loaded_bytes == 0 and cache.stat().st_size > 0
        second = xtrt.build_engine(tiny_torch_onnx, tmp_path / "b.plan", profiles_for(TINY_SPEC),
                                   precision="fp16", timing_cache=cache, workspace_gib=1)
        assert second.timing_cache_loaded_bytes > 0

    def test_int8_calibration_cache_written_and_reused(self, tiny_torch_onnx, tmp_path):
        cache = tmp_path / "calib.cache"
        batches = [_feeds(4, 16, seed=s) for s in range(8)]
        info = xtrt.build_engine(tiny_torch_onnx, tmp_path / "a.plan", profiles_for(TINY_SPEC),
                                 precision="int8", calibration_batches=batches,
                                 calibration_cache=cache, workspace_gib=1)
        assert info.calibration_batches_fed == len(batches)
        assert cache.stat().st_size > 0
        again = xtrt.build_engine(tiny_torch_onnx, tmp_path / "b.plan", profiles_for(TINY_SPEC),
                                  precision="int8", calibration_cache=cache, workspace_gib=1)
        assert again.calibration_batches_fed == 0
        # A random-weight MLP calibrated on noise: only a loose bound is meaningful here.
        report = xtrt.check_engine_parity(tmp_path / "b.plan", tiny_torch_onnx, _feeds(4, 16), 0.95)
        assert np.isfinite(report["Y"]["max_abs_diff"])

    def test_parser_errors_are_listed(self, tmp_path):
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"this is not an onnx graph")
        with pytest.raises(ModelError, match="could not parse"):
            xtrt.build_engine(bad, tmp_path / "m.plan", Profile({"X": ((1,), (1,), (1,))}))
