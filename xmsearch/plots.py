"""PNG charts of training, evaluation and search results, for people who would rather look than read.

``training_curves`` draws a checkpoint's per-epoch history (the mean InfoNCE loss and the
held-out validation recalls that ``xmsearch train`` prints); ``evaluation_chart`` draws the
table ``xmsearch eval`` prints (one panel per query kind, one bar group per metric, one bar
per system: the served model and the raw-encoder baselines); ``results_sheet`` lays out one
search's query and hits as a contact sheet of their photos.  All write files only
(matplotlib's Agg backend: no display on servers or in CI).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from xmsearch.errors import InputError

# The per-epoch validation figures of xmsearch.train.evaluate_views, with their labels.
VALIDATION_CURVES = (("val_image_r1", "held-out photo re-shot -> item Recall@1"),
                     ("val_text_r10", "held-out title as query -> item Recall@10"))
# Query kinds in the order the panels show them, with a readable name.
KIND_NAMES = {"text": "text queries", "image": "photo queries", "text_image": "photo + text queries"}
METRICS = (("recall@1", "R@1"), ("recall@5", "R@5"), ("recall@10", "R@10"), ("mrr", "MRR"),
           ("ndcg@10", "nDCG@10"))


def training_plot_path(checkpoint: Path) -> Path:
    """Where ``xmsearch train`` and ``make demo`` put a checkpoint's curves: beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".training.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)  # a reader never sees half a PNG
    return path


def training_curves(history: list[dict], path: Path, title: str = "fusion training") -> Path:
    """Loss and validation recall per epoch (``TrainResult.history`` / checkpoint
    ``meta["history"]``) as a two-panel PNG at ``path``; returns ``path``."""
    if not history:
        raise InputError("training_curves: the history is empty; train at least one epoch")
    missing = [i for i, h in enumerate(history) if "epoch" not in h or "loss" not in h]
    if missing:
        raise InputError(f"training_curves: history rows {missing[:5]} lack 'epoch' or 'loss'; pass the "
                         "history xmsearch train records")
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss = [h["loss"] for h in history]
    ax_loss.plot(epochs, loss, marker="o", markersize=3)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("mean training loss")
    if all(v > 0 and math.isfinite(v) for v in loss) and max(loss) / min(loss) > 10:
        ax_loss.set_yscale("log")
    ax_loss.grid(True, alpha=0.3)
    drawn = 0
    for key, label in VALIDATION_CURVES:
        if all(key in h for h in history):
            ax_val.plot(epochs, [h[key] for h in history], marker="o", markersize=3, label=label)
            drawn += 1
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation recall")
    ax_val.set_ylim(0, 1.02)
    ax_val.grid(True, alpha=0.3)
    if drawn:
        ax_val.legend(loc="lower right", fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no validation recall recorded", ha="center", va="center",
                    transform=ax_val.transAxes)
    seconds = history[-1].get("seconds")
    fig.suptitle(title + (f" ({len(history)} epochs, {seconds:.0f} s)" if seconds is not None else ""))
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def evaluation_chart(table: dict, path: Path, title: str = "retrieval quality") -> Path:
    """The systems of an evaluation table (``xmsearch.evaluate.report``'s dict) side by side:
    one panel per query kind, grouped bars per metric, one colour per system in every panel;
    returns ``path``.

    Rows of per-language tables (kinds such as ``"text / en"``) and the ``"all"`` row are
    left out: the panels compare systems on each kind of query."""
    systems = {name: kinds for name, kinds in table.items()
               if isinstance(kinds, dict) and any(k in KIND_NAMES for k in kinds)}
    kinds = [k for k in KIND_NAMES if any(k in v for v in systems.values())]
    if not kinds:
        raise InputError("evaluation_chart: the table has no text, image or text_image rows; pass what "
                         "xmsearch eval --json writes")
    plt = _pyplot()
    from matplotlib.patches import Patch

    colour = {name: f"C{i}" for i, name in enumerate(systems)}  # one colour per system in every panel
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        present = [(name, rows[kind]) for name, rows in systems.items() if kind in rows]
        width = 0.8 / len(present)
        for s, (name, row) in enumerate(present):
            xs = [m + (s - (len(present) - 1) / 2) * width for m in range(len(METRICS))]
            ax.bar(xs, [row.get(key, float("nan")) for key, _ in METRICS], width, color=colour[name])
        ax.set_title(f"{KIND_NAMES[kind]} (n={int(present[0][1].get('count', 0))})", fontsize=10)
        ax.set_xticks(range(len(METRICS)), [label for _, label in METRICS], fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mean over queries")
    fig.legend([Patch(color=c) for c in colour.values()], list(colour), loc="lower center",
               ncol=len(colour), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _photo(path, size: int):
    """``path`` decoded as an RGB thumbnail ``size`` px on its long side, or None when it
    cannot be read (moved, deleted, not an image): the sheet shows a blank tile instead."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            img = img.convert("RGB")
            img.thumbnail((size, size))
            return img
    except (OSError, UnidentifiedImageError, ValueError, TypeError, Image.DecompressionBombError):
        return None


# A character every Chinese font has (中): installed fonts with it may caption Chinese titles.
_CJK_PROBE = 0x4E2D
_MAX_EXTRA_FONTS = 3


@functools.lru_cache(maxsize=1)
def caption_fonts() -> tuple[tuple[str, frozenset[int]], ...]:
    """(font file, code points it draws) of the fonts captions may use: matplotlib's default
    sans-serif first, then up to three installed fonts that draw Chinese, so titles in that
    script are drawn wherever such a font exists (matplotlib's bundled fonts have none)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    default = str(font_manager.findfont(font_manager.FontProperties(family=["sans-serif"])))
    fonts = [(default, frozenset(FT2Font(default).get_charmap()))]
    for entry in font_manager.fontManager.ttflist:
        if len(fonts) > _MAX_EXTRA_FONTS:
            break
        # Last Resort (bundled with matplotlib) maps every code point to a placeholder box.
        if entry.fname in {f for f, _ in fonts} or entry.name.startswith("Last Resort"):
            continue
        try:
            charmap = FT2Font(entry.fname).get_charmap()
        except (OSError, RuntimeError):  # unreadable or not a font FreeType can open
            continue
        if _CJK_PROBE in charmap:
            fonts.append((entry.fname, frozenset(charmap)))
    return tuple(fonts)


def font_for(text: str, fonts) -> str | None:
    """The first font file of ``fonts`` ((file, code points) pairs) that draws every character
    of ``text``; None when none does."""
    for path, charmap in fonts:
        if all(ord(ch) in charmap or ch.isspace() for ch in text):
            return path
    return None


def _caption(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def results_sheet(hits: list, path: Path, query_text: str | None = None, query_image=None,
                  columns: int | None = None, title: str | None = None, thumb: int = 192) -> Path:
    """A contact sheet of one search: the query (its photo, its words) in the first tile, then
    each hit's catalogue photo with its rank, score, id and title; returns ``path``.

    ``hits`` are :class:`xmsearch.client.index.Hit` (photos come from their ``image``
    metadata, the path the catalogue gave at indexing; a photo that can no longer be read
    shows as an empty tile); rows of ``columns`` tiles (default: up to six).  Captions use
    matplotlib's default sans-serif, or an installed font that draws Chinese (``caption_fonts``);
    a title no such font draws is captioned with the item's attributes instead."""
    if query_text is None and query_image is None:
        raise InputError("results_sheet: give the query's text, its photo or both")
    if columns is not None and columns < 1:
        raise InputError(f"results_sheet: columns must be 1 or more, got {columns}")
    plt = _pyplot()
    from matplotlib.font_manager import FontProperties

    fonts = caption_fonts()
    words = ([_caption(query_text, 28)] if font_for(query_text, fonts)
             else ["(in a script no installed font draws)"]) if query_text else []
    tiles = [("query", _photo(query_image, thumb) if query_image is not None else None, words)]
    for rank, h in enumerate(hits, start=1):
        meta = h.metadata or {}
        name = str(meta.get("title") or "")
        if not font_for(name, fonts):
            name = ", ".join(str(v) for k, v in meta.items()
                             if k not in ("title", "image", "alt_titles", "lang") and isinstance(v, str))
        photo = _photo(meta["image"], thumb) if meta.get("image") else None
        tiles.append((f"{rank}. {h.id}  {h.score:.3f}", photo, [_caption(name, 28)] if name else []))
    columns = columns or min(len(tiles), 6)  # the query and five hits on one row
    rows = math.ceil(len(tiles) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.75 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (head, photo, lines) in enumerate(tiles):
        ax = axes.flat[i]
        if photo is not None:
            ax.imshow(photo)
        else:
            ax.imshow([[(0.93, 0.93, 0.93)]], extent=(0, 1, 0, 1))
            ax.text(0.5, 0.5, "no photo" if i else "text query", ha="center", va="center", fontsize=9,
                    color="0.4", transform=ax.transAxes)
        caption = "\n".join([head, *lines])
        font = font_for(caption, fonts)  # the default sans for Latin text, else a font with the script
        ax.set_title(caption, fontsize=8, color="C3" if i == 0 else "black",
                     fontproperties=FontProperties(fname=font, size=8) if font else None)
        if i == 0:  # frame the query apart from the results
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("C3")
                side.set_linewidth(2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
