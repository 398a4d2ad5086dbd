"""Fusion training on a small generated catalogue (real frozen encoders, cached features)."""

import hashlib
import os
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
def test_training_features_are_found_again_in_the_cache(trained, small_catalog):
    """What `make demo` reloads for the baselines when it reuses a checkpoint."""
    from xmsearch.train import cached_features, features_path

    result, out = trained
    path = features_path(small_catalog, "minilm-l6", "efficientnet-lite0", 0, out.parent / ".feature-cache")
    again = cached_features(path)
    assert again is not None and again.ids == result.features.ids
    assert torch.equal(again.item_states, result.features.item_states)
    assert torch.equal(again.regions, result.features.regions)
    # Another seed (other augmented views) has its own entry: none cached yet.
    assert cached_features(features_path(small_catalog, "minilm-l6", "efficientnet-lite0", 1,
                                         out.parent / ".feature-cache")) is None


@pytest.mark.slow
def test_checkpoint_records_encoders_and_loads(trained):
    _, path = trained
    ckpt = FusionCheckpoint.load(path)
    assert ckpt.trained and ckpt.text_model == "minilm-l6" and ckpt.image_model == "efficientnet-lite0"
    assert ckpt.meta["items"] == 48 and len(ckpt.meta["history"]) == 25
    # The precision the steps ran in ("auto" resolved on this CPU) is on record.
    assert ckpt.meta["config"]["precision"] == "auto" and ckpt.meta["precision"] in ("fp32", "bf16")
    ckpt.check_encoders("minilm-l6", 384, "efficientnet-lite0", 1800)
    with pytest.raises(CheckpointError, match="trained on text model 'minilm-l6'"):
        ckpt.check_encoders("multilingual-e5-small-q4", 384, "efficientnet-lite0", 1800)


@pytest.mark.slow
def test_a_checkpoint_is_stale_when_its_catalogue_encoders_or_settings_change(trained, small_catalog, tmp_path):
    """What `make demo` asks before it reuses a checkpoint."""
    from xmsearch.train import stale_checkpoint

    _, path = trained
    cfg = TrainConfig(epochs=25, batch_size=48, val_fraction=0.0, seed=0)
    assert stale_checkpoint(path, small_catalog, "minilm-l6", "efficientnet-lite0", cfg) is None
    reason = stale_checkpoint(path, small_catalog, "minilm-l6", "efficientnet-lite0",
                              TrainConfig(epochs=25, batch_size=48, val_fraction=0.0, seed=0, temperature=0.2))
    assert reason == "its training settings differ: temperature 0.1 -> 0.2"
    # The seed changes the feature recipe (other augmented views) as well as the settings.
    assert "feature recipe" in stale_checkpoint(path, small_catalog, "minilm-l6", "efficientnet-lite0",
                                                TrainConfig(epochs=25, batch_size=48, val_fraction=0.0, seed=1))
    assert "trained on minilm-l6" in stale_checkpoint(path, small_catalog, "multilingual-e5-small-q4",
                                                      "efficientnet-lite0", cfg)
    other = tmp_path / "catalog.jsonl"  # the same rows less one: another catalogue
    other.write_text("".join(small_catalog.read_text().splitlines(keepends=True)[:-1]))
    assert "another catalogue" in stale_checkpoint(path, other, "minilm-l6", "efficientnet-lite0", cfg)
    assert "does not exist" in stale_checkpoint(tmp_path / "none.pt", small_catalog, "minilm-l6",
                                                "efficientnet-lite0", cfg)
    older = FusionCheckpoint.load(path)  # saved before checkpoints recorded their features
    del older.meta["features"]
    older.save(tmp_path / "older.pt")
    assert "does not record" in stale_checkpoint(tmp_path / "older.pt", small_catalog, "minilm-l6",
                                                 "efficientnet-lite0", cfg)
    older.meta["features"] = FusionCheckpoint.load(path).meta["features"]
    del older.meta["recipe"]  # saved before checkpoints recorded their training recipe
    older.save(tmp_path / "older.pt")
    assert "training recipe 1" in stale_checkpoint(tmp_path / "older.pt", small_catalog, "minilm-l6",
                                                   "efficientnet-lite0", cfg)
    # A setting added after the checkpoint was trained counts as its default (which trains as
    # before it existed): still current at the default, stale at any other value.
    older = FusionCheckpoint.load(path)
    del older.meta["config"]["group_size"]
    older.save(tmp_path / "older.pt")
    assert stale_checkpoint(tmp_path / "older.pt", small_catalog, "minilm-l6", "efficientnet-lite0", cfg) is None
    assert stale_checkpoint(tmp_path / "older.pt", small_catalog, "minilm-l6", "efficientnet-lite0",
                            TrainConfig(epochs=25, batch_size=48, val_fraction=0.0, seed=0, group_size=2)) \
        == "its training settings differ: group_size 4 -> 2"
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(path.read_bytes()[:1000])
    assert "unreadable" in stale_checkpoint(damaged, small_catalog, "minilm-l6", "efficientnet-lite0", cfg)


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
    # A checkpoint from another version (a setting this one lacks) is refused by name.
    newer = torch.load(str(path), weights_only=True)
    newer["fusion_config"]["future_setting"] = True
    torch.save(newer, str(tmp_path / "newer.pt"))
    with pytest.raises(CheckpointError, match="cannot build .*'future_setting'.*train it again"):
        FusionCheckpoint.load(tmp_path / "newer.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        FusionCheckpoint.load(tmp_path / "junk.pt")


def test_text_views_are_titles_then_short_queries_in_title_order(small_catalog):
    import random

    from xmsearch.train import FILLERS, TEXT_VIEWS, catalogue_words

    rows, _ = read_catalog(small_catalog)
    words = catalogue_words(rows)
    for row in rows[:10]:
        views = text_views(row, random.Random(0), words)
        titles = [row.title] + row.attributes["alt_titles"]
        assert len(views) == TEXT_VIEWS and views[:3] == titles[:3]
        for view in views[3:]:
            for f in FILLERS:  # strip a filler, if any
                if view.startswith(f + " "):
                    view = view[len(f) + 1:]
                    break
            kept = view.split()
            assert 1 <= len(kept) <= 4
            # The kept words appear, in order, in one of the item's titles.
            assert any(_in_order(kept, words(t)) for t in titles), (view, titles)


def _in_order(kept: list[str], source: list[str]) -> bool:
    it = iter(source)
    return all(any(w == s for s in it) for w in kept)


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

    from xmsearch.reshoot import augment_photo

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


def test_photo_views_are_the_same_for_the_same_item_on_every_run(small_catalog, tmp_path):
    # Ingestion's re-shots (xmsearch.reshoot.photo_views): seeded by the item id, so a
    # resumed or repeated ingest stores the same photo-side vectors; a fresh interpreter
    # (another string-hash seed) draws the same bytes.
    import subprocess
    import sys

    from xmsearch.reshoot import photo_views

    rows, _ = read_catalog(small_catalog)
    data = rows[0].image.read_bytes()
    shots = photo_views(data, rows[0].id, 3)
    assert len(set(shots)) == 3 and data not in shots
    assert photo_views(data, rows[0].id, 3) == shots and photo_views(data, rows[0].id, 1) == shots[:1]
    assert photo_views(data, rows[1].id, 3)[0] != shots[0]
    assert photo_views(data, rows[0].id, 0) == []
    script = ("import hashlib, sys; from pathlib import Path; from xmsearch.reshoot import photo_views; "
              "print(hashlib.sha256(b''.join(photo_views(Path(sys.argv[1]).read_bytes(), sys.argv[2], 3))).hexdigest())")
    out = subprocess.run([sys.executable, "-c", script, str(rows[0].image), rows[0].id], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert out == hashlib.sha256(b"".join(shots)).hexdigest()


def test_a_reshot_decodes_the_photo_as_the_server_does(small_catalog):
    """A transparent product photo is composited on white before it is re-shot, as the
    served image preprocessing does (a plain RGB conversion would keep whatever colour the
    transparent pixels hold, here black); an undecodable one is refused by name."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from xmsearch.reshoot import augment_photo

    rows, _ = read_catalog(small_catalog)
    src = np.asarray(Image.open(rows[0].image).convert("RGB"))
    rgba = np.zeros((*src.shape[:2], 4), np.uint8)  # transparent black around the product
    h, w = src.shape[:2]
    rgba[h // 4: 3 * h // 4, w // 4: 3 * w // 4, :3] = src[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    rgba[h // 4: 3 * h // 4, w // 4: 3 * w // 4, 3] = 255
    on_white = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        return buf.getvalue()

    assert augment_photo(png(rgba), random.Random(5)) == augment_photo(png(on_white), random.Random(5))
    with pytest.raises(InputError, match="photo is a corrupt or truncated image"):
        augment_photo(png(on_white)[:200], random.Random(5))


def test_image_regions_are_multiscale_and_normalised_per_depth():
    from xmsearch.models.image import ImageEncoder

    enc = ImageEncoder("efficientnet-lite0")
    assert enc.trunk.widths == [40, 80, 80, 320, 1280] and enc.dim == 1800
    px = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        regions = enc(px)
    assert regions.shape == (2, 49, 1800)
    for part in regions.split(enc.trunk.widths, dim=-1):
        torch.testing.assert_close(part.norm(dim=-1), torch.ones(2, 49), atol=1e-4, rtol=0)
    # The deepest block is the model's own feature map, region for region.
    with torch.no_grad():
        head = enc.trunk.net.extract_features(enc.normalise(px)).flatten(2).transpose(1, 2)
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


@pytest.mark.slow
def test_text_features_keep_the_catalogue_order(trained, small_catalog):
    """Training encodes texts in batches of similar length; the cached states must still be
    each title's own, in catalogue order."""
    from xmsearch.pipeline import Encoders

    result, _ = trained
    rows, _ = read_catalog(small_catalog)
    enc = Encoders.load("minilm-l6")
    lengths = result.features.item_mask.sum(1)
    picks = [int(lengths.argmin()), int(lengths.argmax()), 0, len(rows) - 1]
    for i in picks:
        states, mask = enc.text_states([rows[i].title], "passage")
        n = int(mask.sum())
        assert int(lengths[i]) == n, rows[i].title
        assert torch.allclose(result.features.item_states[i, :n].float(), states[0, :n], atol=2e-2), rows[i].title


def test_trim_padding_drops_the_columns_no_row_uses():
    from xmsearch.models.fusion import AttentionFusion
    from xmsearch.train import trim_padding

    torch.manual_seed(0)
    fusion = AttentionFusion(text_dim=32, image_dim=48, width=64, heads=4, embed_dim=16).eval()
    states = torch.randn(3, 10, 32)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :4], mask[1, :6], mask[2, :2] = True, True, True
    s, m = trim_padding(states, mask)
    assert s.shape == (3, 6, 32) and m.shape == (3, 6) and torch.equal(m, mask[:, :6])
    regions = torch.randn(3, 5, 48)
    with torch.no_grad():
        assert torch.allclose(fusion.encode_text(states, mask), fusion.encode_text(s, m), atol=1e-6)
        assert torch.allclose(fusion.encode_joint(states, mask, regions), fusion.encode_joint(s, m, regions),
                              atol=1e-6)
    empty = trim_padding(states, torch.zeros(3, 10, dtype=torch.bool))
    assert empty[0].shape == (3, 1, 32)


def test_title_words_learn_chinese_words_from_the_catalogue():
    from xmsearch.train import TitleWords

    # Colours, patterns and kinds recombined, as in a catalogue: each word is preceded and
    # followed by many different characters, the strings across word edges are not.
    colours, patterns = ["墨绿色", "大红色", "藏青色", "米白色"], ["格纹", "条纹", "波点"]
    kinds = ["手提包", "羽绒服", "连衣裙", "卫衣"]
    titles = [f"{c}{p}{k}" for c in colours for p in patterns for k in kinds]
    titles += [f"男士{k} {c}" for c in colours for k in kinds] + [f"{k}{p}女款" for p in patterns for k in kinds]
    words = TitleWords(titles)
    assert words("墨绿色格纹手提包") == ["墨绿色", "格纹", "手提包"]
    assert words("Aurelle 大红色波点卫衣, women") == ["Aurelle", "大红色", "波点", "卫衣", "women"]
    # Characters no learned word covers stay together as one unknown word.
    assert words("藏青色面包服") == ["藏青色", "面包服"]
    # Without a catalogue to learn from, a CJK run is one word; Latin words split on spaces.
    assert TitleWords()("墨绿色格纹手提包") == ["墨绿色格纹手提包"]
    assert TitleWords()("navy blue puffer coat, men") == ["navy", "blue", "puffer", "coat", "men"]


def test_onnx_image_path_matches_pytorch(tmp_path):
    """Training features go through ONNX Runtime (3x faster on CPU); same regions as PyTorch."""
    from xmsearch.export.pipeline import sample_images
    from xmsearch.pipeline import Encoders

    enc = Encoders.load("minilm-l6", "efficientnet-lite0")
    photos = sample_images(3, seed=5)
    ref = enc.image_regions(photos)
    path = enc.use_onnx_images(tmp_path)
    assert path.exists() and enc.image_session is not None
    got = enc.image_regions(photos)
    assert got.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=1)
    assert float(cos.min()) > 0.9999
    # A second call reuses the exported graph (same weights, same file).
    assert enc.use_onnx_images(tmp_path) == path
    assert len(list(tmp_path.glob("*.onnx"))) == 1


def test_edit_view_names_what_the_other_item_lacks():
    import random

    from xmsearch.catalog import CatalogRow
    from xmsearch.train import FILLERS, TitleWords, edit_view, title_neighbours

    words = TitleWords()
    red = CatalogRow(1, "a", "red down jacket, men", Path("a.jpg"))
    blue = CatalogRow(2, "b", "blue down jacket, men", Path("b.jpg"))
    for seed in range(10):
        text = edit_view(red, blue, random.Random(seed), words)
        said = text.split()
        assert said[-1] == "red" and "down" not in said and "blue" not in said
        assert text == "red" or any(text.startswith(f + " ") for f in FILLERS)
    from xmsearch.train import edit_partners

    far = CatalogRow(3, "c", "Nordvik green striped down jacket, women", Path("c.jpg"))
    assert edit_partners(red, [far, blue], random.Random(0), words)[0] == 1
    # A candidate with every one of the item's words is the same product in other words,
    # no edit: the nearest one that lacks something is taken.
    same = CatalogRow(5, "e", "down jacket in red, men", Path("e.jpg"))
    assert edit_partners(red, [same, far, blue], random.Random(0), words)[0] == 2
    assert edit_partners(red, [same], random.Random(0), words)[0] == 0
    # The other item's titles in every language count: a Chinese-titled red jacket whose
    # English alt title has "red" lacks nothing but "men".
    red_zh = CatalogRow(4, "d", "红色羽绒服", Path("d.jpg"), {"alt_titles": ["red down jacket"]})
    assert edit_view(red, red_zh, random.Random(1), words).split()[-1] == "men"
    states = torch.tensor([[[1.0, 0.0]], [[0.9, 0.1]], [[0.0, 1.0]], [[0.1, 0.9]]])
    nbrs = title_neighbours(states, torch.ones(4, 1, dtype=torch.bool), k=2, chunk=3)
    assert nbrs[:, 0].tolist() == [1, 0, 3, 2]
    assert all(i not in row for i, row in enumerate(nbrs.tolist()))


@pytest.mark.slow
def test_train_command_writes_a_loadable_checkpoint(small_catalog, tmp_path, capsys):
    from xmsearch.cli import main

    out = tmp_path / "fusion.pt"
    assert main(["train", str(small_catalog), "--out", str(out), "--epochs", "2",
                 "--text-model", "minilm-l6", "--item-mix", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert f"saved {out}" in printed
    # The loss and validation curves are drawn beside the checkpoint unless asked otherwise.
    plot = tmp_path / "fusion.training.png"
    assert f"training curves: {plot}" in printed and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = FusionCheckpoint.load(out)
    assert ckpt.meta["epochs"] == 2 and ckpt.meta["items"] == 48
    # The default 5% validation items (2 of 48) keep two views out; the items still train.
    assert ckpt.meta["val_items"] == 2
    # The stored-item mix travels in the module's own settings, so export serves it.
    assert ckpt.fusion.item_mix == 0.25 and ckpt.meta["config"]["item_mix"] == 0.25


def test_train_command_defaults_are_the_training_defaults():
    # The parser spells TrainConfig's defaults out (so that --help needs no torch): they
    # must not drift apart from the dataclass that `make demo` and the library use.
    from xmsearch.cli import build_parser

    a = build_parser().parse_args(["train", "catalog.jsonl", "--out", "x.pt"])
    cfg = TrainConfig()
    for name in ("epochs", "batch_size", "lr", "weight_decay", "seed", "val_fraction", "group_size",
                 "edit_positives", "view_positives", "item_mix", "precision"):
        assert getattr(a, name) == getattr(cfg, name), name


def test_training_bars_count_each_stage_from_the_report_before_it(monkeypatch):
    # A stage's bar opens at its first report, one batch or epoch in: its rate must count
    # from when the stage began (the report before, or the start), not from that first report.
    import xmsearch.cli as cli

    clock = iter([130.0, 150.0, 160.0, 175.0, 185.0])
    monkeypatch.setattr(cli.time, "time", lambda: next(clock))
    bars = cli.TrainingProgress(epochs=2, started=100.0)
    bars.progress("titles", 64, 128)  # at 130
    assert bars.bar.start_t == 100.0
    bars.progress("titles", 128, 128)  # at 150
    bars.progress("photos", 64, 128)  # at 160
    assert bars.bar.start_t == 150.0 and bars.bar.n == 64
    bars.on_epoch({"loss": 1.0, "val_image_r1": 0.5, "val_text_r10": 0.5})  # at 175
    assert bars.bar.start_t == 160.0 and bars.bar.n == 1
    bars.on_epoch({"loss": 0.9, "val_image_r1": 0.6, "val_text_r10": 0.6})  # at 185
    assert bars.bar.start_t == 160.0 and bars.bar.n == 2
    bars.close()


def test_train_command_plot_options(capsys):
    from xmsearch.cli import build_parser

    parser = build_parser()
    a = parser.parse_args(["train", "c.jsonl", "--out", "x.pt"])
    assert (a.plot, a.no_plot) == (None, False)
    assert parser.parse_args(["train", "c.jsonl", "--out", "x.pt", "--plot", "curves.png"]).plot == Path("curves.png")
    assert parser.parse_args(["train", "c.jsonl", "--out", "x.pt", "--no-plot"]).no_plot
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "c.jsonl", "--out", "x.pt", "--plot", "c.png", "--no-plot"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_views_share_positives_with_items_that_have_all_their_words():
    from xmsearch.train import info_nce, shared_word_positives

    items = [frozenset({"blue", "down", "jacket", "men"}), frozenset({"blue", "down", "jacket", "striped"}),
             frozenset({"red", "down", "jacket"})]
    views = [frozenset({"blue", "jacket"}), frozenset({"striped"}), frozenset({"down", "jacket"})]
    pos = shared_word_positives(views, items)
    assert pos.tolist() == [[True, True, False], [False, True, False], [True, True, True]]
    scale = torch.tensor(10.0)
    gen = torch.Generator().manual_seed(0)
    q, z = (torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1) for _ in range(2))
    # Only the diagonal: the plain symmetric InfoNCE.
    assert torch.allclose(info_nce(q, z, scale, torch.eye(3, dtype=torch.bool)), info_nce(q, z, scale))
    # Queries 0 and 1 fit anchors 0 and 1 alike: with them as shared positives the loss
    # prefers queries between the two anchors, the plain loss each query on its own anchor.
    z = torch.eye(3)
    own = torch.eye(3)
    between = torch.stack([(z[0] + z[1]) / 2 ** 0.5, (z[0] + z[1]) / 2 ** 0.5, z[2]])
    shared = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert info_nce(between, z, scale, shared) < info_nce(own, z, scale, shared)
    assert info_nce(own, z, scale) < info_nce(between, z, scale)


def test_edit_views_share_positives_with_their_targets_nearest_items():
    from xmsearch.train import neighbour_positives

    # Batch of items 7, 2, 5, 9; rows of ``nbrs`` are items, their nearest items by the model.
    idx = torch.tensor([7, 2, 5, 9])
    nbrs = torch.zeros(10, 2, dtype=torch.long)
    nbrs[7] = torch.tensor([5, 1])  # 5 is in the batch, 1 is not
    nbrs[2] = torch.tensor([3, 4])  # neither is
    nbrs[5] = torch.tensor([7, 9])
    nbrs[9] = torch.tensor([9, 2])  # itself (never, but harmless) and 2
    pos = neighbour_positives(idx, nbrs)
    assert pos.tolist() == [[True, False, True, False],
                            [False, True, False, False],
                            [True, False, True, True],
                            [False, True, False, True]]


def test_neighbour_batches_group_look_alikes_and_keep_every_item_once():
    from xmsearch.train import neighbour_batches

    items = torch.arange(100, 112)
    # Rows index positions in ``items``: 0-3, 4-7 and 8-11 are three groups of look-alikes.
    neighbours = torch.tensor([[(i // 4) * 4 + (i + d) % 4 for d in (1, 2, 3)] for i in range(12)])
    gen = torch.Generator().manual_seed(0)
    order = neighbour_batches(items, neighbours, 4, gen)
    assert sorted(order.tolist()) == items.tolist()
    # Cut into batches of 4, every batch is one whole group.
    assert [len({(int(x) - 100) // 4 for x in order[i:i + 4]}) for i in range(0, 12, 4)] == [1, 1, 1]
    # Group size 1, or no neighbours yet: a plain shuffle of the same items.
    for plain in (neighbour_batches(items, neighbours, 1, gen), neighbour_batches(items, None, 4, gen)):
        assert sorted(plain.tolist()) == items.tolist()


def test_validation_items_train_on_every_view_but_the_two_held_out():
    from xmsearch.train import ViewSampler

    n, n_text, n_views = 40, 6, 4
    val = torch.tensor([3, 7, 11])
    sampler = ViewSampler(n_text, n_views, val, n, torch.Generator().manual_seed(0))
    items = torch.arange(n).repeat(200)
    is_val = torch.isin(items, val)
    text, shot, photo = sampler.text(items), sampler.photo(items), sampler.photo(items, low=0)
    # Validation items: never their query-worded title (view 0) nor their last re-shot ...
    assert set(text[is_val].tolist()) == set(range(1, n_text))
    assert set(shot[is_val].tolist()) == set(range(1, n_views - 1))
    assert set(photo[is_val].tolist()) == set(range(0, n_views - 1))
    # ... which every other item trains on, as on all its other views.
    assert set(text[~is_val].tolist()) == set(range(n_text))
    assert set(shot[~is_val].tolist()) == set(range(1, n_views))
    assert set(photo[~is_val].tolist()) == set(range(n_views))
    # One re-shot (or one text view) per item leaves nothing to hold out.
    assert ViewSampler.can_hold_out(6, 3)
    assert not ViewSampler.can_hold_out(6, 2) and not ViewSampler.can_hold_out(1, 4)
    with pytest.raises(ValueError, match="nothing to hold out"):
        ViewSampler(n_text, 2, val, n, torch.Generator())


@pytest.mark.slow
def test_item_neighbours_are_the_nearest_item_embeddings(trained):
    from xmsearch.train import _embed_items, embed_all_items, nearest_rows

    result, _ = trained
    f = result.features
    fusion = result.checkpoint.fusion
    idx = torch.arange(len(f.ids))[::2]
    with torch.no_grad():
        reduced = fusion.image_reduce(f.regions.float())  # the module's own frozen PCA, as in training
    fusion.train()
    nb = nearest_rows(embed_all_items(fusion, f, reduced)[idx], k=3, chunk=7)
    assert nb.shape == (len(idx), 3) and fusion.training is False
    z = _embed_items(fusion.eval(), f, reduced, idx)
    sims = z @ z.T
    for a in range(len(idx)):
        assert a not in nb[a].tolist()
        others = sims[a].clone()
        others[a] = -2
        assert torch.allclose(sims[a, nb[a]], others.topk(3).values, atol=1e-5)


def test_edit_partners_are_ranked_by_what_they_lack():
    import random

    from xmsearch.catalog import CatalogRow
    from xmsearch.train import TitleWords, edit_partners

    words = TitleWords()
    red = CatalogRow(1, "a", "red down jacket, men", Path("a.jpg"))
    cands = [CatalogRow(2, "b", "down jacket in red, men", Path("b.jpg")),  # lacks nothing
             CatalogRow(3, "c", "green striped down jacket, women", Path("c.jpg")),  # lacks red, men
             CatalogRow(4, "d", "blue down jacket, men", Path("d.jpg")),  # lacks red
             CatalogRow(5, "e", "red hat, men", Path("e.jpg"))]  # lacks down, jacket
    for seed in range(5):
        got = edit_partners(red, cands, random.Random(seed), words, n=4)
        assert got[0] == 2 and set(got[1:3]) == {1, 3} and got[3] == 0
    # Asking for more than there are returns them all, in the same order.
    assert (edit_partners(red, cands, random.Random(0), words, n=9)
            == edit_partners(red, cands, random.Random(0), words, n=4))


def test_a_damaged_feature_cache_is_dropped_not_trusted(tmp_path):
    from xmsearch.train import cached_features

    path = tmp_path / "features-0123456789abcdef.pt"
    assert cached_features(path) is None  # nothing cached
    path.write_bytes(b"not a torch file")
    assert cached_features(path) is None
    assert not path.exists()


def test_bad_training_settings_are_refused_before_any_encoding(tmp_path, capsys):
    from xmsearch.cli import main

    out = tmp_path / "fusion.pt"
    assert main(["train", str(tmp_path / "no-catalog.jsonl"), "--out", str(out),
                 "--item-mix", "-1", "--epochs", "0", "--weight-decay", "-0.1"]) == 2
    err = capsys.readouterr().err
    assert "epochs must be >= 1, got 0" in err and "item_mix must be in [0, 10], got -1.0" in err
    assert "weight_decay must be >= 0, got -0.1" in err
    assert not out.exists()
    with pytest.raises(InputError, match="temperature must be > 0"):
        TrainConfig(temperature=0)
    with pytest.raises(InputError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        TrainConfig(precision="fp16")


@pytest.mark.slow
def test_bf16_training_follows_fp32_and_keeps_fp32_weights(trained):
    """bf16 autocast changes the arithmetic of the steps, not what is learned or saved:
    the same seed gives the same losses to within bf16's rounding, and the module that
    export loads still holds fp32 weights."""
    from xmsearch.train import train_fusion

    result, _ = trained
    runs = {p: train_fusion(result.features, "minilm-l6", "efficientnet-lite0",
                            TrainConfig(epochs=3, batch_size=48, val_fraction=0.0, seed=0, precision=p))
            for p in ("fp32", "bf16")}
    for a, b in zip(runs["fp32"].history, runs["bf16"].history):
        assert abs(a["loss"] - b["loss"]) < 0.02 * a["loss"], (a, b)
    assert runs["bf16"].checkpoint.meta["precision"] == "bf16"
    assert runs["fp32"].checkpoint.meta["precision"] == "fp32"
    assert {p.dtype for p in runs["bf16"].checkpoint.fusion.parameters()} == {torch.float32}
    # And the run differs at all: autocast really took the steps to bf16.
    assert runs["fp32"].history[-1]["loss"] != runs["bf16"].history[-1]["loss"]


def test_info_nce_logits_stay_fp32_under_autocast():
    from xmsearch.train import info_nce

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(64, 256, generator=g), dim=-1)
    z = torch.nn.functional.normalize(q + 0.05 * torch.randn(64, 256, generator=g), dim=-1)
    scale = torch.tensor(100.0)
    ref = info_nce(q, z, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = info_nce(q, z, scale)
    assert amp.dtype == torch.float32 and torch.allclose(amp, ref, rtol=1e-5), (amp, ref)


def test_auto_precision_is_bf16_only_where_the_cpu_has_it():
    from xmsearch.train import bf16_supported, resolve_precision

    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") == ("bf16" if bf16_supported() else "fp32")
