"""Fusion training on a small generated catalogue (real frozen encoders, cached features)."""

from pathlib import Path

import pytest
import torch

from xmsearch.catalog import read_catalog
from xmsearch.checkpoint import FusionCheckpoint
from xmsearch.errors import CheckpointError, InputError
from xmsearch.train import TrainConfig, text_views, train_catalog


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    from xmsearch.demo import generate_demo_catalog

    out = tmp_path_factory.mktemp("train-catalog")
    generate_demo_catalog(out, n=48, seed=3, n_queries=12)
    return out / "catalog.jsonl"


@pytest.fixture(scope="module")
def trained(small_catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-out") / "fusion.pt"
    cfg = TrainConfig(epochs=25, batch_size=48, val_fraction=0.0, seed=0)
    return train_catalog(small_catalog, out, "minilm-l6", "efficientnet-lite0", cfg), out


@pytest.mark.slow
def test_training_reduces_loss_and_beats_chance(trained):
    result, _ = trained
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < 0.6 * first["loss"], result.history
    # 48 items: chance is 1/48 for photo R@1 and 10/48 for title R@10.
    assert last["val_image_r1"] >= 0.5, last
    assert last["val_text_r10"] >= 0.6, last


@pytest.mark.slow
def test_checkpoint_records_encoders_and_loads(trained):
    _, path = trained
    ckpt = FusionCheckpoint.load(path)
    assert ckpt.trained and ckpt.text_model == "minilm-l6" and ckpt.image_model == "efficientnet-lite0"
    assert ckpt.meta["items"] == 48 and len(ckpt.meta["history"]) == 25
    ckpt.check_encoders("minilm-l6", 384, "efficientnet-lite0", 1800)
    with pytest.raises(CheckpointError, match="trained on text model 'minilm-l6'"):
        ckpt.check_encoders("multilingual-e5-small-q4", 384, "efficientnet-lite0", 1800)


@pytest.mark.slow
def test_tampered_checkpoint_is_refused(trained, tmp_path):
    _, path = trained
    payload = torch.load(str(path), weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name] + 0.01
    bad = tmp_path / "tampered.pt"
    torch.save(payload, str(bad))
    with pytest.raises(CheckpointError, match="SHA-256"):
        FusionCheckpoint.load(bad)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        FusionCheckpoint.load(tmp_path / "junk.pt")


def test_text_views_are_generic_and_partial(small_catalog):
    import random

    rows, _ = read_catalog(small_catalog)
    views, partial = text_views(rows[0], random.Random(0))
    assert views[0] == rows[0].title and not partial[0]
    assert any(partial) and all(v.strip() for v in views)


@pytest.mark.parametrize("n", [1, 3])
def test_training_refuses_a_tiny_catalogue(tmp_path, small_catalog, n):
    lines = small_catalog.read_text().splitlines()[:n]
    tiny = small_catalog.parent / f"tiny-{n}.jsonl"
    tiny.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="at least 8 items"):
        train_catalog(tiny, tmp_path / "x.pt", "minilm-l6", "efficientnet-lite0", TrainConfig(epochs=1))


def test_reshot_photo_keeps_size_and_colour_but_changes_pixels(small_catalog):
    """A re-shot is a new photo of the same product: same size, new pixels, the product's
    colour family kept (median hue of saturated pixels within a few degrees)."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from xmsearch.train import augment_photo

    rows, _ = read_catalog(small_catalog)
    saturated = [r for r in rows if r.attributes["colour"] in ("red", "blue", "green", "yellow")][:3]
    assert saturated
    for row in saturated:
        data = row.image.read_bytes()
        shots = [augment_photo(data, random.Random(k)) for k in range(3)]
        src = Image.open(io.BytesIO(data)).convert("RGB")
        assert len(set(shots)) == 3 and data not in shots
        for shot in shots:
            img = Image.open(io.BytesIO(shot))
            assert img.format == "JPEG" and img.size == src.size
            diff = np.abs(np.asarray(img.convert("RGB"), np.int16) - np.asarray(src, np.int16)).mean()
            assert diff > 3.0

        def hue(im):
            hsv = np.asarray(im.convert("HSV"), np.float32).reshape(-1, 3)
            sat = hsv[hsv[:, 1] > 120]
            ang = sat[:, 0] / 255 * 2 * np.pi
            return np.degrees(np.arctan2(np.sin(ang).mean(), np.cos(ang).mean()))

        for shot in shots:
            d = abs((hue(Image.open(io.BytesIO(shot))) - hue(src) + 180) % 360 - 180)
            assert d < 15, f"{row.id}: re-shot moved the hue by {d:.1f} degrees"


def test_image_regions_are_multiscale_and_normalised_per_depth():
    from xmsearch.models.image import ImageEncoder

    enc = ImageEncoder("efficientnet-lite0")
    assert enc.trunk.widths == [40, 80, 80, 320, 1280] and enc.dim == 1800
    px = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        regions = enc(px)
    assert regions.shape == (2, 49, 1800)
    for part in regions.split(enc.trunk.widths, dim=-1):
        torch.testing.assert_close(part.norm(dim=-1), torch.ones(2, 49), atol=1e-4, rtol=0)
    # The deepest block is the model's own feature map, region for region.
    with torch.no_grad():
        head = enc.trunk.net.extract_features(px).flatten(2).transpose(1, 2)
    torch.testing.assert_close(regions[..., -1280:], torch.nn.functional.normalize(head, dim=-1),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_baselines_from_the_training_features_match_fresh_encoding(trained, small_catalog):
    """make demo reuses the training features as the baselines' catalogue side: the rankings
    must be those of encoding the catalogue again (fp16 cache: top-5 sets agree)."""
    from xmsearch import evaluate as ev

    result, _ = trained
    queries = ev.load_queries(small_catalog.parent / "queries.jsonl")
    fresh = ev.run_baselines(small_catalog, queries, "minilm-l6", "efficientnet-lite0", k=5)
    cached = ev.run_baselines(small_catalog, queries, "minilm-l6", "efficientnet-lite0", k=5,
                              features=result.features)
    for system in fresh:
        assert fresh[system].keys() == cached[system].keys() and fresh[system]
        same = [fresh[system][q][0] == cached[system][q][0] for q in fresh[system]]
        assert sum(same) >= len(same) - 1, system
    other = result.features
    other_ids = type(other)(**{**other.__dict__, "ids": list(reversed(other.ids))})
    with pytest.raises(InputError, match="another catalogue"):
        ev.run_baselines(small_catalog, queries, "minilm-l6", "efficientnet-lite0", features=other_ids)


def test_words_split_latin_and_cjk_runs():
    from xmsearch.train import _words

    assert _words("Aurelle黄色鸭舌帽，条纹款") == ["Aurelle", "黄色", "鸭舌", "帽", "条纹款"]
    assert _words("navy blue puffer coat, men") == ["navy", "blue", "puffer", "coat", "men"]


def test_edit_view_names_what_the_other_item_lacks():
    import random

    from xmsearch.catalog import CatalogRow
    from xmsearch.train import FILLERS, edit_view, title_neighbours

    red = CatalogRow(1, "a", "red down jacket, men", Path("a.jpg"))
    blue = CatalogRow(2, "b", "blue down jacket, men", Path("b.jpg"))
    for seed in range(10):
        text = edit_view(red, blue, random.Random(seed))
        words = text.split()
        assert words[-1] == "red" and "down" not in words and "blue" not in words
        assert text == "red" or any(text.startswith(f + " ") for f in FILLERS)
    from xmsearch.train import edit_partner

    far = CatalogRow(3, "c", "Nordvik green striped down jacket, women", Path("c.jpg"))
    assert edit_partner(red, [far, blue], random.Random(0)) == 1
    states = torch.tensor([[[1.0, 0.0]], [[0.9, 0.1]], [[0.0, 1.0]], [[0.1, 0.9]]])
    nbrs = title_neighbours(states, torch.ones(4, 1, dtype=torch.bool), k=2, chunk=3)
    assert nbrs[:, 0].tolist() == [1, 0, 3, 2]
    assert all(i not in row for i, row in enumerate(nbrs.tolist()))


@pytest.mark.slow
def test_train_command_writes_a_loadable_checkpoint(small_catalog, tmp_path, capsys):
    from xmsearch.cli import main

    out = tmp_path / "fusion.pt"
    assert main(["train", str(small_catalog), "--out", str(out), "--epochs", "2",
                 "--text-model", "minilm-l6"]) == 0
    assert f"saved {out}" in capsys.readouterr().out
    ckpt = FusionCheckpoint.load(out)
    assert ckpt.meta["epochs"] == 2 and ckpt.meta["items"] == 48
