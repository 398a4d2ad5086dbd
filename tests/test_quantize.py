"""The int8 text encoder and fusion graphs of the cpu target (``xmsearch export
--text-precision / --fusion-precision``).

The session's shared repository (``exported_repository``) keeps them in fp32 so the served
vectors can be held to PyTorch exactly; here the default export (int8 on the cpu target) is
built once, its graphs and record are checked, and a real tritonserver serves it against
the same PyTorch reference with the looser bound int8 earns.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.test_serving import CHINESE, ENGLISH, embed
from xmsearch import spec as S
from xmsearch.errors import ModelError
from xmsearch.export import quantize
from xmsearch.export.pipeline import (FUSION_MEMBERS, ExportResult, export_repository, quantize_member,
                                      sample_images)
from xmsearch.export.repository import read_config

# Fused-embedding cosine, int8-served vs the fp32 PyTorch reference.  The export's per-token
# check bounds the encoder (quantize.INT8_MIN_COSINE); after the fusion's pooling the vectors
# sit closer still (0.985-0.997 for these texts with the seeded fusion, measured with the
# one-scale-per-run int8 of before 2026-12-06; one scale per token is closer to fp32).
SERVED_MIN_COSINE = 0.97


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory) -> ExportResult:
    out = tmp_path_factory.mktemp("int8_repository")
    if not quantize.cpu_has_int8_dot_product():
        pytest.skip("this CPU has no int8 dot product (VNNI / AMX / ARM64): the default export keeps "
                    "the text encoder in fp32; `--text-precision int8` would still work, less accurately")
    return export_repository(out, "cpu", untrained=True)  # text_precision="auto"


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_auto_is_int8_on_a_cpu_with_int8_dot_products_and_fp32_elsewhere() -> None:
    assert quantize.resolve_precision("auto", on_gpu=False, int8_cpu=True) == "int8"
    assert quantize.resolve_precision("auto", on_gpu=False, int8_cpu=False) == "fp32"
    assert quantize.resolve_precision("auto", on_gpu=True, int8_cpu=True) == "fp32"
    assert quantize.resolve_precision("auto", on_gpu=False) == (
        "int8" if quantize.cpu_has_int8_dot_product() else "fp32")
    assert quantize.resolve_precision("fp32", on_gpu=False) == "fp32"
    with pytest.raises(ModelError, match="^text precision int8 .*CPU provider only.*--target tensorrt"):
        quantize.resolve_precision("int8", on_gpu=True)
    with pytest.raises(ModelError, match="^fusion precision 'int4'.*auto, fp32, int8"):
        quantize.resolve_precision("int4", on_gpu=False, what="fusion")


def test_int8_on_a_gpu_target_is_refused_before_any_export(tmp_path: Path) -> None:
    for target in ("tensorrt", "onnxruntime"):  # onnxruntime defaults to GPU instances
        for what in ("text", "fusion"):
            with pytest.raises(ModelError, match=f"^{what} precision int8 is dynamic ONNX Runtime quantization"):
                export_repository(tmp_path / target, target, untrained=True, **{f"{what}_precision": "int8"})
            assert not (tmp_path / target).exists()


def test_default_cpu_export_serves_int8_text_encoder_and_fusion(int8_export: ExportResult,
                                                                exported_repository: Path) -> None:
    out = int8_export.out
    assert (int8_export.text_precision, int8_export.fusion_precision) == ("int8", "int8")
    record = json.loads((out / "xmsearch_export.json").read_text())
    assert (record["text_precision"], record["fusion_precision"]) == ("int8", "int8")
    int8_members = (S.TEXT_ENCODER, *FUSION_MEMBERS)
    for member in int8_members:
        int8_ops = _ops(out / member / "1" / "model.onnx")
        assert {"MatMulIntegerToFloat", "QuantizeLinear"} <= int8_ops and "DynamicQuantizeLinear" not in int8_ops
        assert "MatMulIntegerToFloat" not in _ops(exported_repository / member / "1" / "model.onnx")
        assert not list((out / member / "1").glob("*.fp32.onnx"))  # the fp32 step is not shipped
    assert "MatMulIntegerToFloat" not in _ops(out / S.IMAGE_ENCODER / "1" / "model.onnx")  # nothing else
    # The fp32 graph was checked at the usual bound before quantization, the int8 one after.
    reports: dict[str, list] = {}
    for r in int8_export.parity:
        reports.setdefault(r.model, []).append(r)
    for member in int8_members:
        assert min(r.min_cosine for r in reports[member]) >= 0.9999
    int8 = reports[f"{S.TEXT_ENCODER} (int8)"][0]
    assert quantize.INT8_MIN_COSINE <= int8.min_cosine < 0.9999
    for member in FUSION_MEMBERS:  # every output of the fusion graphs (fusion_item has two)
        fused = reports[f"{member} (int8)"]
        assert len(fused) == len(read_config(out / member / "config.pbtxt").output)
        assert all(quantize.FUSION_INT8_MIN_COSINE <= r.min_cosine < 0.9999999 for r in fused), fused
    # Served like the fp32 graph: the cpu target's text encoder layout, two instances of one
    # thread, whatever the precision; its query head is the int8 fusion_text graph.
    for repo in (out, exported_repository):
        cfg = read_config(repo / S.TEXT_ENCODER / "config.pbtxt")
        assert (cfg.instance_group[0].count, cfg.parameters["intra_op_threads"].string_value) == (2, "1")
        head = repo / S.TEXT_ENCODER / "1" / S.QUERY_HEAD_FILE
        assert head.read_bytes() == (repo / S.FUSION_TEXT / "1" / "model.onnx").read_bytes()
    # Other vectors, so another fingerprint: an index built on the fp32 server is refused.
    fp32_record = json.loads((exported_repository / "xmsearch_export.json").read_text())
    assert (fp32_record["text_precision"], fp32_record["fusion_precision"]) == ("fp32", "fp32")
    assert record["fingerprint"] != fp32_record["fingerprint"]


def test_int8_parity_check_names_the_way_out(int8_export: ExportResult, reference_pipeline) -> None:
    enc = reference_pipeline.encoders
    ids, mask = (torch.from_numpy(a) for a in enc.text_pre.encode(ENGLISH, "passage"))
    path = int8_export.out / S.TEXT_ENCODER / "1" / "model.onnx"
    report = quantize.check_int8_parity(enc.text, path, [(ids, mask)])
    assert report.cases == 1 and report.min_cosine >= quantize.INT8_MIN_COSINE
    with pytest.raises(ModelError, match=r"need cosine >= 1 per token.*--text-precision fp32"):
        quantize.check_int8_parity(enc.text, path, [(ids, mask)], min_cosine=1.0)


class _Block(torch.nn.Module):
    """A transformer-like block in miniature: a layer norm feeding two projections (one
    activation, two products), a GELU, and an output projection."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(32)
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(32, 64)
        self.out = torch.nn.Linear(64, 16)

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.nn.functional.gelu(self.a(h)) * self.b(h))


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "tokens"}, "y": {0: "batch", 1: "tokens"}},
                          opset_version=17, dynamo=False)
    return path


def test_int8_rows_come_out_the_same_alone_or_batched(tmp_path: Path) -> None:
    from xmsearch.export.onnx import onnx_session

    block = _Block().eval()
    x = torch.randn(6, 5, 32) * torch.linspace(0.01, 30.0, 6)[:, None, None]  # rows of very different range
    x[2, 1] = 0.0  # zeros after the layer norm too: scale 0, products 0 (not NaN)
    int8 = quantize.quantize_int8(_export(block, x[:2], tmp_path / "block.onnx"), tmp_path / "block.int8.onnx")
    model = onnx.load(str(int8))
    ops = [n.op_type for n in model.graph.node]
    # Three products, two activations: the normalised input is quantized once for both of its products.
    assert ops.count("MatMulIntegerToFloat") == 3 and ops.count("QuantizeLinear") == 2 and "MatMul" not in ops
    assert {i.data_type for i in model.graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.INT8}

    sess = onnx_session(int8)
    batched = sess.run(None, {"x": x.numpy()})[0]
    alone = np.concatenate([sess.run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    tokens_alone = sess.run(None, {"x": x[3:4, 2:3].numpy()})[0]
    np.testing.assert_array_equal(alone, batched)  # no row's scale comes from another row
    np.testing.assert_array_equal(tokens_alone[0, 0], batched[3, 2])  # nor from another token
    with torch.no_grad():
        want = block(x).numpy()
    assert np.isfinite(batched).all()
    cos = np.sum(want * batched, -1) / (np.linalg.norm(want, axis=-1) * np.linalg.norm(batched, axis=-1))
    assert cos.min() > 0.99, np.round(cos, 4)  # every row near fp32, the smallest-range row included


def test_quantizing_a_graph_of_an_old_opset_is_refused(tmp_path: Path) -> None:
    block = _Block().eval()
    src = _export(block, torch.randn(2, 3, 32), tmp_path / "block.onnx")
    model = onnx.load(str(src))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 9
    with pytest.raises(ModelError, match="opset >= 10.*opset 9"):
        quantize.rewrite_matmuls_int8(model)


def test_batch_independence_check_catches_one_activation_scale_per_run(
        int8_export: ExportResult, exported_repository: Path, reference_pipeline, tmp_path: Path) -> None:
    """The export's check passes the per-token graph and refuses the one-scale-per-run graph
    of onnxruntime's quantize_dynamic (the text encoder's int8 before 2026-12-06)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    texts = ["blue down jacket", ENGLISH[2], CHINESE[1], "hat"]  # lengths far apart: padding in the batch
    cases = [tuple(torch.from_numpy(a) for a in reference_pipeline.encoders.text_pre.encode(texts, "passage"))]
    served = int8_export.out / S.TEXT_ENCODER / "1" / "model.onnx"
    assert quantize.check_batch_independence(served, cases) <= quantize.INT8_MAX_BATCH_DRIFT
    per_run = tmp_path / "per_run.onnx"
    quantize_dynamic(str(exported_repository / S.TEXT_ENCODER / "1" / "model.onnx"), str(per_run),
                     op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8)
    with pytest.raises(ModelError, match=r"alone and in a batch of 4 differ.*batch-mates.*--text-precision fp32"):
        quantize.check_batch_independence(per_run, cases)


def test_row_independence_check_of_any_graph(tmp_path: Path) -> None:
    """The fusion graphs' check (``check_rows_independent``) passes a per-token int8 graph and
    refuses one whose activation scale is taken over the whole run."""
    from types import SimpleNamespace

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from xmsearch.export.onnx import onnx_session

    block = _Block().eval()
    x = torch.randn(6, 5, 32) * torch.linspace(0.01, 30.0, 6)[:, None, None]
    fp32 = _export(block, x[:2], tmp_path / "block.onnx")
    spec = SimpleNamespace(name="block", inputs=[SimpleNamespace(name="x")], outputs=[SimpleNamespace(name="y")])
    per_token = quantize.quantize_int8(fp32, tmp_path / "block.int8.onnx")
    assert quantize.check_rows_independent(onnx_session(per_token), spec, (x,), rows=6) == 0.0
    per_run = tmp_path / "block.per_run.onnx"
    quantize_dynamic(str(fp32), str(per_run), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8)
    with pytest.raises(ModelError, match=r"^block: a row's outputs alone and in a batch of 6 differ.*batch-mates"):
        quantize.check_rows_independent(onnx_session(per_run), spec, (x,), rows=6)


def test_int8_fusion_graph_below_its_bound_is_refused_naming_the_way_out(
        exported_repository: Path, reference_pipeline, tmp_path: Path, monkeypatch) -> None:
    from xmsearch.models.fusion import FusionEntry

    fp32 = exported_repository / S.FUSION_TEXT / "1" / "model.onnx"
    spec = S.member_specs(reference_pipeline.encoders.dims)[S.FUSION_TEXT]
    module = FusionEntry(reference_pipeline.fusion, "text").eval()
    cases = [reference_pipeline.encoders.text_states(ENGLISH + CHINESE, "query")]
    steps: list[str] = []
    path = tmp_path / "ok" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(fp32.read_bytes())
    (report,) = quantize_member(module, spec, path, cases, steps.append)
    assert report.model == f"{S.FUSION_TEXT} (int8)" and report.min_cosine >= quantize.FUSION_INT8_MIN_COSINE
    assert "MatMulIntegerToFloat" in _ops(path) and not list(path.parent.glob("*.fp32.onnx"))
    assert any("batch independence" in m for m in steps)
    monkeypatch.setattr(quantize, "FUSION_INT8_MIN_COSINE", 1.0)  # no int8 graph reaches cosine 1
    path = tmp_path / "strict" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(fp32.read_bytes())
    with pytest.raises(ModelError, match=r"^int8 fusion_text: ONNX parity check failed \(need cosine >= 1\).*"
                                         r"--fusion-precision fp32$"):
        quantize_member(module, spec, path, cases, steps.append)


def test_quantizing_a_graph_without_matmul_is_an_error(tmp_path: Path) -> None:
    class Scale(torch.nn.Module):
        def forward(self, x):
            return x * 2.0 + 1.0

    src = tmp_path / "scale.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(Scale(), (torch.ones(2, 3),), str(src), input_names=["x"], dynamo=False)
    with pytest.raises(ModelError, match="changed no MatMul"):
        quantize.quantize_int8(src, tmp_path / "scale.int8.onnx")


@pytest.mark.triton
def test_int8_repository_served_stays_close_to_the_fp32_reference(
        int8_export: ExportResult, start_triton, reference_pipeline) -> None:
    import tritonclient.grpc as grpcclient

    photos = sample_images(4)
    titles = [ENGLISH[1], CHINESE[1], ENGLISH[2], "白色帆布鞋 white canvas sneakers"]
    with start_triton(int8_export.out) as server:
        client = grpcclient.InferenceServerClient(server.url)
        try:
            served = {"query_text": embed(client, S.QUERY_TEXT, texts=ENGLISH + CHINESE),
                      "item": embed(client, S.ITEM, texts=titles, images=photos),
                      "query_image": embed(client, S.QUERY_IMAGE, images=photos)}
            # One request of five texts, and five requests of one: the same vectors, as a row's
            # int8 activation scales are its own (and so under Triton's dynamic batching too).
            alone = np.concatenate([embed(client, S.QUERY_TEXT, texts=[t]) for t in ENGLISH + CHINESE])
        finally:
            client.close()
    reference = {"query_text": reference_pipeline.embed(ENGLISH + CHINESE, None, "query"),
                 "item": reference_pipeline.embed(titles, photos, "passage"),
                 "query_image": reference_pipeline.embed(None, photos, "query")}
    np.testing.assert_allclose(alone, served["query_text"], atol=1e-5)
    for name, got in served.items():
        want = reference[name]
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4, err_msg=name)
        cos = np.sum(got * want, axis=1) / np.linalg.norm(want, axis=1)
        if name == "query_image":  # no text on this path, only the fusion graph in int8
            assert 0.999 <= cos.min() and cos.min() < 0.9999999, f"{name}: {np.round(cos, 5)}"
        else:  # close, and not the fp32 vectors: the int8 graph is the one being served
            assert SERVED_MIN_COSINE <= cos.min() and cos.min() < 0.9999, f"{name}: {np.round(cos, 5)}"
