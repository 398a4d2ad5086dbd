"""The training-curve and evaluation charts: real PNGs drawn from real-shaped records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmsearch.errors import InputError
from xmsearch.plots import evaluation_chart, training_curves, training_plot_path


def _history(epochs: int = 6, photo: float = 0.9) -> list[dict]:
    return [{"epoch": e, "loss": 18.0 / e, "val_image_r1": photo * e / epochs, "val_text_r10": min(1.0, 0.2 * e),
             "seconds": 7.0 * e} for e in range(1, epochs + 1)]


def _table(fused_photo_r1: float = 0.86) -> dict:
    def row(r1, r10, n=100):
        return {"recall@1": r1, "recall@5": r10, "recall@10": r10, "mrr": r1, "ndcg@10": r10, "count": n}

    return {"fused (served)": {"image": row(fused_photo_r1, 1.0), "text": row(0.89, 0.80),
                               "text_image": row(0.94, 0.74), "all": row(0.9, 0.85, 300)},
            "baseline: raw text encoder": {"text": row(0.71, 0.32), "text_image": row(0.09, 0.08)},
            "baseline: raw image encoder": {"image": row(0.03, 0.10), "text_image": row(0.06, 0.03)},
            "fused (served), by language": {"text / en": row(0.88, 0.81, 61), "text / zh": row(0.9, 0.79, 39)}}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_training_curves_draw_loss_and_validation_recall(tmp_path: Path) -> None:
    out = training_curves(_history(), tmp_path / "plots" / "fusion.training.png")
    assert out == tmp_path / "plots" / "fusion.training.png"
    a = _pixels(out)
    assert a.shape[1] > a.shape[0] > 300  # two panels side by side
    assert not list(out.parent.glob("*.tmp"))  # written whole, then renamed
    # Another run draws another picture: the curves come from the records.
    b = _pixels(training_curves(_history(photo=0.3), tmp_path / "other.png"))
    assert a.shape == b.shape and (a != b).any()
    # A history without validation figures (validation off) still draws its loss.
    bare = [{"epoch": h["epoch"], "loss": h["loss"]} for h in _history()]
    assert _pixels(training_curves(bare, tmp_path / "bare.png")).size
    assert training_plot_path(Path("demo/fusion-minilm-l6.pt")) == Path("demo/fusion-minilm-l6.training.png")


def test_training_curves_refuse_what_is_not_a_history(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="history is empty"):
        training_curves([], tmp_path / "x.png")
    with pytest.raises(InputError, match=r"history rows \[1\] lack 'epoch' or 'loss'"):
        training_curves([{"epoch": 1, "loss": 2.0}, {"epoch": 2}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_evaluation_chart_draws_each_system_per_query_kind(tmp_path: Path) -> None:
    a = _pixels(evaluation_chart(_table(), tmp_path / "eval.png"))
    assert a.shape[1] > 2 * a.shape[0]  # three panels: text, photo, photo + text
    b = _pixels(evaluation_chart(_table(fused_photo_r1=0.3), tmp_path / "eval2.png"))
    assert a.shape == b.shape and (a != b).any()
    # Only the served system (xmsearch eval without --baselines), one kind: one panel.
    only = {"fused (served)": {"text": _table()["fused (served)"]["text"]}}
    c = _pixels(evaluation_chart(only, tmp_path / "one.png"))
    assert c.shape[1] < a.shape[1]
    with pytest.raises(InputError, match="no text, image or text_image rows"):
        evaluation_chart({"fused (served), by language": _table()["fused (served), by language"]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _hits(tmp_path: Path, n: int = 4) -> list:
    from xmsearch.client.index import Hit

    hits = []
    for i in range(n):
        photo = tmp_path / f"p{i}.jpg"
        Image.new("RGB", (256, 256), (40 * i, 200 - 30 * i, 90)).save(photo, "JPEG")
        hits.append(Hit(f"p{i:06d}", 0.9 - 0.05 * i, i, {"title": f"blue down jacket {i}", "image": str(photo),
                                                          "category": "down_jacket", "colour": "blue"}))
    return hits


def test_results_sheet_shows_the_query_and_each_hit_photo(tmp_path: Path) -> None:
    from xmsearch.plots import results_sheet

    hits = _hits(tmp_path)
    query = tmp_path / "query.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(query)
    a = _pixels(results_sheet(hits, tmp_path / "sheet.png", query_text="like this but in red", query_image=query))
    assert a.shape[1] > a.shape[0]  # five tiles on one row
    # A photo that cannot be read any more (moved, corrupt) leaves an empty tile, not an error.
    (tmp_path / "p2.jpg").write_bytes(b"not a jpeg")
    b = _pixels(results_sheet(hits, tmp_path / "sheet2.png", query_text="like this but in red", query_image=query))
    assert a.shape == b.shape and (a != b).any()
    hits[1].metadata.pop("image")
    assert _pixels(results_sheet(hits, tmp_path / "sheet3.png", query_text="jacket")).size
    # Two rows when the hits do not fit one (six tiles a row unless told).
    c = _pixels(results_sheet(_hits(tmp_path, 7), tmp_path / "rows.png", query_text="jacket"))
    assert c.shape[0] > a.shape[0]
    d = _pixels(results_sheet(_hits(tmp_path, 7), tmp_path / "cols.png", query_text="jacket", columns=4))
    assert d.shape[1] < c.shape[1]
    with pytest.raises(InputError, match="give the query's text, its photo or both"):
        results_sheet(hits, tmp_path / "x.png")
    with pytest.raises(InputError, match="columns must be 1 or more"):
        results_sheet(hits, tmp_path / "x.png", query_text="jacket", columns=0)
    assert not (tmp_path / "x.png").exists()


def test_sheet_captions_use_a_font_that_draws_the_script() -> None:
    from xmsearch.plots import caption_fonts, font_for

    latin = frozenset(map(ord, "abcdefghijklmnopqrstuvwxyz ,.0123456789"))
    cjk = latin | frozenset(map(ord, "蓝色羽绒服"))
    assert font_for("navy puffer coat", [("sans.ttf", latin), ("cjk.ttf", cjk)]) == "sans.ttf"
    assert font_for("蓝色羽绒服", [("sans.ttf", latin), ("cjk.ttf", cjk)]) == "cjk.ttf"
    assert font_for("蓝色羽绒服", [("sans.ttf", latin)]) is None  # captioned with attributes then
    # What this machine offers: matplotlib's default sans first, then only fonts that draw Chinese.
    fonts = caption_fonts()
    assert font_for("navy puffer coat, men 0.823", fonts) == fonts[0][0]
    assert all(0x4E2D in charmap for _, charmap in fonts[1:])
    assert not any("LastResort" in path for path, _ in fonts)  # draws boxes for every character
    assert (font_for("中", fonts) is None) == (len(fonts) == 1)
