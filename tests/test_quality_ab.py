"""The training A/B harness and the feature-encoding timing run on a tiny catalogue (no
timing or quality assertions: they only keep the scripts from rotting)."""

from pathlib import Path

import pytest

from benchmarks import feature_encoding, quality_ab


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
    out = tmp_path / "mix.md"
    argv = ["--catalog", str(tiny_demo), "--text-model", "minilm-l6", "--seeds", "0",
            "--variant", "plain:epochs=2,group_size=1", "--item-mix", "0", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert quality_ab.main(argv) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| plain")]
    assert [r.split("|")[1].strip() for r in rows] == ["plain @ item_mix 0", "plain @ item_mix 1"]
    assert "item_mix=0.0" in rows[0] and "item_mix=1.0" in rows[1]
    # One training per seed: both rows report the same training time.
    assert rows[0].rsplit("|", 2)[1] == rows[1].rsplit("|", 2)[1]
    log = capsys.readouterr().out
    assert "plain @ item_mix 0 seed 0:" in log and "plain @ item_mix 1 seed 0:" in log
