"""Fusion training on a small generated catalogue (real frozen encoders, cached features)."""

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
    ckpt.check_encoders("minilm-l6", 384, "efficientnet-lite0", 1280)
    with pytest.raises(CheckpointError, match="trained on text model 'minilm-l6'"):
        ckpt.check_encoders("multilingual-e5-small-q4", 384, "efficientnet-lite0", 1280)


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


def test_training_refuses_a_tiny_catalogue(tmp_path, small_catalog):
    lines = small_catalog.read_text().splitlines()[:3]
    tiny = small_catalog.parent / "tiny.jsonl"
    tiny.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="at least 8 items"):
        train_catalog(tiny, tmp_path / "x.pt", "minilm-l6", "efficientnet-lite0", TrainConfig(epochs=1))
