"""The training A/B harness and the feature-encoding timing run on a tiny catalogue (no
timing or quality assertions: they only keep the scripts from rotting)."""

from pathlib import Path

import pytest

from benchmarks import feature_encoding, quality_ab, train_precision


def test_variants_parse_into_train_config_overrides():
    assert quality_ab.parse_variant("base:") == quality_ab.parse_variant("base") == ("base", {})
    assert quality_ab.parse_variant("g:group_size=8,lr=0.001") == ("g", {"group_size": 8, "lr": 0.001})
    for bad, match in [(":epochs=3", "give it a name"),
                       ("x:no_such=1", "no_such"), ("x:epochs", "KEY=VALUE")]:
        with pytest.raises(ValueError, match=match):
            quality_ab.parse_variant(bad)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> Path:
    from xmsearch.demo import generate_demo_catalog

    out = tmp_path_factory.mktemp("ab-demo")
    generate_demo_catalog(out, n=24, seed=5, n_queries=9)
    return out


@pytest.mark.slow
def test_quality_ab_trains_each_variant_and_writes_its_table(tiny_demo, tmp_path, capsys):
    out = tmp_path / "ab.md"
    argv = ["--catalog", str(tiny_demo), "--text-model", "minilm-l6", "--seeds", "0", "1",
            "--variant", "plain:epochs=2,group_size=1", "--variant", "grouped:epochs=3,group_size=2",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert quality_ab.main(argv) == 0
    text = out.read_text()
    assert text.startswith("$ python -m benchmarks.quality_ab --catalog")
    rows = [line for line in text.splitlines() if line.startswith("| plain") or line.startswith("| grouped")]
    assert len(rows) == 2 and "epochs=2, group_size=1" in rows[0] and "| 0 1 |" in rows[1]
    # Each figure is a mean over the two seeds with its range, all within [0, 1].
    cells = [c.strip() for c in rows[1].split("|")[4:8]]
    for cell in cells:
        mean, spread = cell.split(" ", 1)
        lo, hi = (float(x) for x in spread.strip("()").split("-"))
        assert 0.0 <= lo <= float(mean) <= hi <= 1.0
    assert "plain seed 1" in capsys.readouterr().out


@pytest.mark.slow
def test_feature_encoding_times_both_runtimes(tiny_demo, tmp_path, capsys):
    out = tmp_path / "fe.txt"
    assert feature_encoding.main(["--catalog", str(tiny_demo), "--images", "4", "--rounds", "2",
                                  "--out", str(out)]) == 0
    text = out.read_text()
    for step in ("augment (re-shot)", "decode + preprocess", "encoder, PyTorch eager", "encoder, ONNX Runtime"):
        assert f"| {step} |" in text
    cos = float(text.rsplit("lowest cosine between the two outputs ", 1)[1].split()[0])
    assert cos > 0.999


@pytest.mark.slow
def test_quality_ab_evaluates_each_trained_model_at_every_item_mix(tiny_demo, tmp_path, capsys):
    from xmsearch.demo import generate_demo_catalog

    # A development query set of the same catalogue, disjoint from its queries.jsonl.
    dev = tmp_path / "dev"
    generate_demo_catalog(dev, n=24, seed=5, n_queries=6, first_query=9)
    out = tmp_path / "mix.md"
    argv = ["--catalog", str(tiny_demo), "--text-model", "minilm-l6", "--seeds", "0",
            "--variant", "plain:epochs=2,group_size=1", "--item-mix", "0", "1",
            "--dev-queries", str(dev / "queries.jsonl"),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert quality_ab.main(argv) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| plain")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "plain @ item_mix 0", "plain @ item_mix 0, dev queries", "plain @ item_mix 1", "plain @ item_mix 1, dev queries"]
    assert "item_mix=0.0" in rows[0] and "item_mix=1.0" in rows[2]
    # One training per seed: every row reports the same training time.
    assert len({r.rsplit("|", 2)[1] for r in rows}) == 1
    log = capsys.readouterr().out
    assert "plain @ item_mix 0 seed 0 (eval queries):" in log and "plain @ item_mix 1 seed 0 (dev queries):" in log


def plain_rows(tiny_demo, tmp_path, *options):
    """quality_ab on the tiny demo with one two-epoch variant, ``plain``, and ``options``: its
    arguments and the table's ``plain`` rows, split into cells."""
    out = tmp_path / "rows.md"
    argv = ["--catalog", str(tiny_demo), "--text-model", "minilm-l6", "--seeds", "0",
            "--variant", "plain:epochs=2,group_size=1", *options,
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert quality_ab.main(argv) == 0
    return argv, [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| plain")]


@pytest.mark.slow
def test_quality_ab_evaluates_photo_side_vectors_with_reshots(tiny_demo, tmp_path, capsys):
    argv, rows = plain_rows(tiny_demo, tmp_path, "--photo-views", "0", "2")
    assert [r[0] for r in rows] == ["| plain @ photo_views 0", "| plain @ photo_views 2"]
    assert "photo_views=2" in rows[1][1]
    # Only photo queries are ranked by photo-side vectors: the text and text+image columns agree.
    assert (rows[0][3], rows[0][5]) == (rows[1][3], rows[1][5])
    with pytest.raises(SystemExit):
        quality_ab.main(argv[:-4] + ["--photo-views", "-1"])
    assert "--photo-views: each count must be from 0 to 16" in capsys.readouterr().err


@pytest.mark.slow
def test_quality_ab_evaluates_stored_vectors_with_and_without_other_titles(tiny_demo, tmp_path):
    _, rows = plain_rows(tiny_demo, tmp_path, "--alt-titles", "off", "on")
    assert [r[0] for r in rows] == ["| plain @ alt_titles off", "| plain @ alt_titles on"]
    assert "alt_titles=True" in rows[1][1] and "alt_titles=False" in rows[0][1]
    # The other titles move the searched vectors: some figure of the two rows differs.
    assert rows[0][3:7] != rows[1][3:7]


@pytest.mark.slow
def test_train_precision_times_both_precisions(tiny_demo, tmp_path, capsys):
    from xmsearch.catalog import read_catalog
    from xmsearch.pipeline import Encoders
    from xmsearch.train import load_or_compute_features

    cache = tmp_path / "cache"
    argv = ["--catalog", str(tiny_demo), "--text-model", "minilm-l6", "--cache-dir", str(cache),
            "--epochs", "2", "--rounds", "1", "--out", str(tmp_path / "tp.md")]
    with pytest.raises(SystemExit):  # nothing cached yet: says so instead of encoding
        train_precision.main(argv)
    assert "no cached features" in capsys.readouterr().err
    rows, _ = read_catalog(tiny_demo / "catalog.jsonl")
    load_or_compute_features(tiny_demo / "catalog.jsonl", Encoders.load("minilm-l6", "efficientnet-lite0"),
                             rows, cache, seed=0)
    assert train_precision.main(argv) == 0
    text = (tmp_path / "tp.md").read_text()
    assert text.startswith("$ python -m benchmarks.train_precision --catalog")
    fp32, bf16 = ([c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
                  if line.startswith("| fp32") or line.startswith("| bf16"))
    assert fp32[3] == "1.00x" and bf16[3].endswith("x") and fp32[2] == bf16[2] == "1"
    assert train_precision.epoch_seconds([{"seconds": 1.0}, {"seconds": 2.5}, {"seconds": 4.0}]) == [1.5, 1.5]
