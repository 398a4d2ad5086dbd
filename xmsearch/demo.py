"""A reproducible demo product catalogue, drawn with PIL (nothing is downloaded).

``generate_demo_catalog(out_dir, n, seed, n_queries)`` writes::

    out_dir/catalog.jsonl     one product per line (id, title, image, alt_titles, attributes)
    out_dir/images/           one JPEG per product (256x256)
    out_dir/queries.jsonl     held-out evaluation queries with graded relevance
    out_dir/query_images/     the photos used by image and text+image queries

Every product has an *identity* that survives re-rendering: the exact shade of its
colour, the parameters of its pattern (stripe width and angle, dot size, check size),
an accent colour on one part (collar, sole, strap, brim...), a small logo mark and its
proportions.  A photograph of a product (catalogue image or query photo) is one
*rendering* of that identity: background, position, scale (+-10%), rotation, lighting,
sensor noise and JPEG quality change from one rendering to the next, the product does
not.  A photo query is therefore a new rendering of a catalogue item, never a copy of
its catalogue image.

Determinism: every random choice comes from a numpy ``Generator`` seeded by
``(seed, stream, index)``, so item ``i`` is the same whatever ``n`` is and whatever order
items are drawn in, and the same ``(n, seed, n_queries)`` gives byte-identical files.

Catalogue row fields: ``id`` ("p000123"), ``title`` (English for about two thirds of the
items, Chinese for the rest), ``lang`` (the title's language), ``image`` (relative to
the catalogue file), ``alt_titles`` (the title in the other language and a synonym
variant: extra training views), ``category``, ``colour``, ``pattern`` (keys from
:data:`CATEGORIES`, :data:`COLOURS`, :data:`PATTERNS`), ``gender`` ("men", "women",
"unisex" or null), ``price`` and ``brand`` (invented names).

Query fields: ``qid``, ``kind`` ("text", "image" or "text_image"), ``text`` (text kinds),
``image`` (image kinds, relative to the queries file), ``lang`` ("en" or "zh"; image-only
queries carry "en", they have no text) and ``relevant`` (product id -> grade):

- text ("blue down jacket", "蓝色羽绒服"): grade 2 for the asked colour and category,
  grade 1 for the same category in another colour;
- image: grade 2 for the photographed product only;
- text_image (a photo of category C in colour X plus "like this but in red" / "同款红色"):
  grade 2 for C in the asked colour, grade 1 for C in any other colour (X included).

Query phrasings are partly held out: query templates differ from title templates and
some category words appear only in queries.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm import tqdm

from xmsearch.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SIZE = 256
# Products are drawn at twice the output size and downsampled: cheap anti-aliasing.
_CANVAS = 2 * IMAGE_SIZE
# Share of the canvas left free around the product's unit box on each side.
_MARGIN = 0.13

CATALOG_FILE = "catalog.jsonl"
QUERIES_FILE = "queries.jsonl"
IMAGES_DIR = "images"
QUERY_IMAGES_DIR = "query_images"

# Random streams: one per purpose, so adding a query never changes an item.
_STREAM_ITEM = 1
_STREAM_CATALOG_RENDER = 2
_STREAM_QUERY = 3
_STREAM_LAYOUT = 4
_STREAM_ITEM_TEXT = 5

QUERY_KINDS = ("text", "image", "text_image")

RGB = tuple[int, int, int]


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Category:
    """A product category: its title words in both languages and its price range."""

    key: str
    en: tuple[str, ...]  # title synonyms; the first is the canonical name
    zh: tuple[str, ...]
    query_en: tuple[str, ...]  # held-out words, used only by queries
    query_zh: tuple[str, ...]
    genders: tuple[str | None, ...]
    price: tuple[float, float]


@dataclass(frozen=True)
class Colour:
    """A colour name and the HSV region its shades are drawn from."""

    key: str
    en: tuple[str, ...]
    zh: tuple[str, ...]
    hsv: tuple[float, float, float]
    jitter: tuple[float, float, float]  # +- on hue, saturation, value


@dataclass(frozen=True)
class Pattern:
    """A surface pattern; an empty word means "left unsaid in this title"."""

    key: str
    en: tuple[str, ...]
    zh: tuple[str, ...]


_CATEGORY_LIST = (
    Category("down_jacket", ("down jacket", "puffer jacket", "puffer coat", "quilted down coat"),
             ("羽绒服", "羽绒外套", "羽绒夹克"), ("winter puffer", "padded coat"), ("面包服", "冬季羽绒衣"),
             ("men", "women"), (59.0, 320.0)),
    Category("t_shirt", ("T-shirt", "tee", "crew-neck tee", "short-sleeve T-shirt"),
             ("T恤", "短袖T恤", "圆领T恤"), ("tee shirt", "top with short sleeves"), ("体恤", "短袖上衣"),
             ("men", "women", "unisex"), (9.0, 45.0)),
    Category("dress", ("dress", "midi dress", "sleeveless dress"),
             ("连衣裙", "中长款连衣裙", "无袖连衣裙"), ("frock", "summer dress"), ("长裙", "夏季裙装"),
             ("women",), (25.0, 160.0)),
    Category("trousers", ("trousers", "pants", "straight-leg trousers"),
             ("长裤", "休闲裤", "直筒裤"), ("slacks", "long pants"), ("裤子", "西裤"),
             ("men", "women"), (19.0, 110.0)),
    Category("sneakers", ("sneakers", "trainers", "running shoes"),
             ("运动鞋", "跑鞋", "休闲鞋"), ("athletic shoes", "kicks"), ("球鞋", "跑步鞋"),
             ("men", "women", "unisex"), (35.0, 180.0)),
    Category("boots", ("boots", "ankle boots", "leather boots"),
             ("靴子", "短靴", "皮靴"), ("winter boots", "lace-up boots"), ("马丁靴", "高帮靴"),
             ("men", "women"), (45.0, 240.0)),
    Category("handbag", ("handbag", "tote bag", "shoulder bag"),
             ("手提包", "托特包", "单肩包"), ("purse", "top-handle bag"), ("女包", "包包"),
             ("women", None), (29.0, 400.0)),
    Category("backpack", ("backpack", "rucksack", "daypack"),
             ("双肩包", "背包", "书包"), ("knapsack", "school backpack"), ("旅行背包", "电脑包"),
             ("unisex", None), (25.0, 150.0)),
    Category("hat", ("baseball cap", "cap", "hat"),
             ("棒球帽", "鸭舌帽", "帽子"), ("ball cap", "peaked cap"), ("遮阳帽", "运动帽"),
             ("unisex", "men", "women"), (8.0, 40.0)),
    Category("watch", ("watch", "wristwatch", "analog watch"),
             ("手表", "腕表", "石英表"), ("timepiece", "wrist watch"), ("表", "指针手表"),
             ("men", "women", "unisex"), (39.0, 650.0)),
    Category("hoodie", ("hoodie", "hooded sweatshirt", "pullover hoodie"),
             ("连帽卫衣", "卫衣", "套头卫衣"), ("hooded top", "sweatshirt with hood"), ("帽衫", "连帽衫"),
             ("men", "women", "unisex"), (22.0, 95.0)),
    Category("skirt", ("skirt", "A-line skirt", "pleated skirt"),
             ("半身裙", "A字裙", "百褶裙"), ("short skirt", "flared skirt"), ("短裙", "伞裙"),
             ("women",), (15.0, 90.0)),
)

_COLOUR_LIST = (
    Colour("red", ("red", "scarlet"), ("红色", "大红色"), (0.995, 0.80, 0.82), (0.015, 0.08, 0.07)),
    Colour("orange", ("orange",), ("橙色", "橘色"), (0.070, 0.85, 0.95), (0.012, 0.08, 0.04)),
    Colour("yellow", ("yellow", "mustard yellow"), ("黄色", "明黄色"), (0.140, 0.80, 0.95), (0.012, 0.10, 0.04)),
    Colour("green", ("green",), ("绿色", "墨绿色"), (0.350, 0.65, 0.58), (0.030, 0.10, 0.08)),
    Colour("blue", ("blue", "royal blue"), ("蓝色", "宝蓝色"), (0.590, 0.72, 0.85), (0.020, 0.08, 0.07)),
    Colour("navy", ("navy", "navy blue", "dark blue"), ("藏青色", "藏蓝色", "深蓝色"),
           (0.630, 0.75, 0.36), (0.015, 0.08, 0.05)),
    Colour("purple", ("purple", "violet"), ("紫色", "深紫色"), (0.780, 0.55, 0.60), (0.020, 0.08, 0.07)),
    Colour("pink", ("pink", "light pink"), ("粉色", "粉红色"), (0.935, 0.32, 0.96), (0.015, 0.06, 0.03)),
    Colour("brown", ("brown", "chocolate brown"), ("棕色", "咖啡色"), (0.070, 0.65, 0.44), (0.012, 0.08, 0.05)),
    Colour("black", ("black",), ("黑色",), (0.0, 0.0, 0.10), (0.0, 0.03, 0.04)),
    Colour("white", ("white", "off-white"), ("白色", "米白色"), (0.0, 0.0, 0.96), (0.0, 0.03, 0.025)),
    Colour("grey", ("grey", "gray"), ("灰色", "浅灰色"), (0.0, 0.0, 0.56), (0.0, 0.03, 0.07)),
)

_PATTERN_LIST = (
    Pattern("plain", ("", "plain", "solid"), ("", "纯色", "素色")),
    Pattern("striped", ("striped", "stripe"), ("条纹",)),
    Pattern("dotted", ("polka-dot", "dotted", "spotted"), ("波点", "圆点")),
    Pattern("checked", ("checked", "plaid", "check"), ("格子", "格纹")),
)

CATEGORIES: tuple[str, ...] = tuple(c.key for c in _CATEGORY_LIST)
COLOURS: tuple[str, ...] = tuple(c.key for c in _COLOUR_LIST)
PATTERNS: tuple[str, ...] = tuple(p.key for p in _PATTERN_LIST)
_CATEGORY = {c.key: c for c in _CATEGORY_LIST}
_COLOUR = {c.key: c for c in _COLOUR_LIST}
_PATTERN = {p.key: p for p in _PATTERN_LIST}

# The smallest catalogue in which every category comes in at least two colours
# (text+image queries need a second colour of the photographed category).
MIN_ITEMS = 2 * len(CATEGORIES)

_BRANDS = (
    "Nordvik", "Lumora", "Kestrel", "Aurelle", "Brisa", "Tundra Peak", "Maison Vell", "Oakhollow",
    "Zephyra", "Halden", "Corvo", "Mistral Lane", "Pinecrest", "Solenne", "Rivo", "Quillon",
    "Ember & Ash", "Velora", "Granite Co", "Lark Studio", "Yunshan", "Moritz", "Saltmarsh", "Tamsin",
)

_GENDER_EN = {  # adjective before the noun, noun after a comma, "for ..." form
    "men": ("men's", "men", "men"),
    "women": ("women's", "women", "women"),
    "unisex": ("unisex", "unisex", "everyone"),
}
_GENDER_ZH = {"men": ("男款", "男士", "男"), "women": ("女款", "女士", "女"), "unisex": ("中性", "男女同款")}

# Accent and logo colours: distinct, named-looking hues, so that two products of the same
# category, colour and pattern still differ where a shopper would look.
_ACCENTS: tuple[RGB, ...] = (
    (212, 175, 55), (196, 198, 206), (245, 236, 205), (0, 128, 128), (205, 170, 125), (54, 54, 62),
    (128, 0, 36), (140, 230, 170), (255, 120, 80), (120, 124, 20), (120, 200, 240), (180, 130, 220),
    (250, 250, 250), (18, 18, 18), (230, 175, 10), (210, 30, 35), (40, 70, 205), (30, 110, 60),
)
_WATCH_FACES: tuple[RGB, ...] = ((250, 250, 246), (242, 232, 205), (22, 22, 26), (28, 40, 90), (200, 202, 210))


# --------------------------------------------------------------------------- colour helpers


def _hsv_rgb(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def _distance(a: RGB, b: RGB) -> float:
    return math.dist(a, b)


def _luma(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------- item identity


@dataclass(frozen=True)
class _Identity:
    """Everything that makes one product look like itself in every photo."""

    category: str
    colour: str
    pattern: str
    shade: RGB
    accent: RGB
    pattern_rgb: RGB
    stripe: tuple[float, float, float]  # width, gap (canvas px), angle (degrees)
    dots: tuple[float, float, bool]  # radius, spacing (canvas px), staggered rows
    check: tuple[float, float]  # cell size (canvas px), band share of a cell
    logo_shape: str
    logo_rgb: RGB
    logo_size: float  # unit-box share
    logo_offset: tuple[float, float]  # unit-box offset from the category's anchor
    prop: tuple[float, float, float, float]  # proportion knobs in [-1, 1]; the 4th adds a part when > 0
    details: int  # count of quilting lines, pleats, laces ...
    face_rgb: RGB  # watches only
    hands: tuple[float, float]  # watch hand angles (radians)


def _layout(seed: int, index: int) -> tuple[str, str]:
    """Category and colour of item ``index``.

    Items walk the 12x12 category/colour grid so that every combination appears once in
    each block of 144 items and the first 12 items already cover every category and
    every colour; the seed only permutes the names.
    """
    rng = _rng(seed, _STREAM_LAYOUT, 0)
    cat_order = rng.permutation(len(CATEGORIES))
    col_order = rng.permutation(len(COLOURS))
    j = index % (len(CATEGORIES) * len(COLOURS))
    c = j % len(CATEGORIES)
    k = (j // len(CATEGORIES) + c) % len(COLOURS)
    return CATEGORIES[int(cat_order[c])], COLOURS[int(col_order[k])]


def _shade(rng: np.random.Generator, colour: Colour) -> RGB:
    h, s, v = colour.hsv
    dh, ds, dv = colour.jitter
    return _hsv_rgb(h + rng.uniform(-dh, dh), s + rng.uniform(-ds, ds), v + rng.uniform(-dv, dv))


def _identity(seed: int, index: int) -> _Identity:
    category, colour = _layout(seed, index)
    rng = _rng(seed, _STREAM_ITEM, index)
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=[0.4, 0.2, 0.2, 0.2]))]
    shade = _shade(rng, _COLOUR[colour])
    far = [a for a in _ACCENTS if _distance(a, shade) > 90]
    accent = _pick(rng, far)
    # The pattern's second colour must read as "stripes on red", not as a second colour
    # name: white, black, or a tint or shade of the item's own colour.
    white, black = (242, 242, 238), (26, 26, 30)
    pattern_choices = [
        white if _luma(shade) < 200 else (30, 40, 90),
        black if _luma(shade) > 60 else (200, 200, 200),
        _mix(shade, (255, 255, 255), 0.55),
        _mix(shade, (0, 0, 0), 0.5),
    ]
    pattern_rgb = _pick(rng, pattern_choices)
    stripe_w = float(rng.uniform(8, 24))
    # Gaps wider than stripes keep the item's own colour the dominant one.
    stripe = (stripe_w, float(stripe_w * rng.uniform(1.2, 2.6)),
              float(_pick(rng, (0.0, 90.0, 45.0, 135.0)) + rng.uniform(-12, 12)))
    dot_r = float(rng.uniform(5, 15))
    dots = (dot_r, float(dot_r * rng.uniform(2.4, 4.0)), bool(rng.random() < 0.5))
    check = (float(rng.uniform(24, 64)), float(rng.uniform(0.25, 0.5)))
    logo_shape = _pick(rng, ("circle", "square", "triangle", "diamond", "star", "bar"))
    logo_rgb = _pick(rng, [a for a in _ACCENTS if _distance(a, shade) > 110])
    logo_size = float(rng.uniform(0.08, 0.15))
    logo_offset = (float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04)))
    prop = tuple(float(x) for x in rng.uniform(-1, 1, 4))
    details = int(rng.integers(3, 8))
    face_rgb = _pick(rng, _WATCH_FACES)
    hands = (float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 2 * math.pi)))
    return _Identity(category, colour, pattern, shade, accent, pattern_rgb, stripe, dots, check,
                     logo_shape, logo_rgb, logo_size, logo_offset, prop, details, face_rgb, hands)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- drawing


def _u(v: float) -> float:
    """Unit-box coordinate -> canvas pixels."""
    return (_MARGIN + v * (1 - 2 * _MARGIN)) * _CANVAS


def _pts(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(_u(x), _u(y)) for x, y in points]


def _box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    return (_u(x0), _u(y0), _u(x1), _u(y1))


# A shape is ("poly", points) | ("ellipse", box) | ("rrect", box, radius) | ("chord", box, a0, a1),
# all in unit-box coordinates.
Shape = tuple


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill, outline=None, width: int = 0) -> None:
    kind = shape[0]
    if kind == "poly":
        draw.polygon(_pts(shape[1]), fill=fill, outline=outline, width=width or 1)
    elif kind == "ellipse":
        draw.ellipse(_box(*shape[1]), fill=fill, outline=outline, width=width or 1)
    elif kind == "rrect":
        draw.rounded_rectangle(_box(*shape[1]), radius=shape[2] * _CANVAS, fill=fill, outline=outline,
                               width=width or 1)
    elif kind == "chord":
        draw.chord(_box(*shape[1]), shape[2], shape[3], fill=fill, outline=outline, width=width or 1)
    else:  # pragma: no cover - programming error in a drawer
        raise ValueError(f"unknown shape kind {kind!r}")


def _pattern_image(ident: _Identity) -> Image.Image:
    """The item's fabric: its shade with its pattern, covering the whole canvas."""
    size = (_CANVAS, _CANVAS)
    base = Image.new("RGBa", size, ident.shade + (255,))
    if ident.pattern == "plain":
        return base
    ink = Image.new("RGBa", size, ident.pattern_rgb + (255,))
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    if ident.pattern == "striped":
        width, gap, angle = ident.stripe
        a = math.radians(angle)
        dx, dy = math.cos(a), math.sin(a)  # stripe direction
        nx, ny = -dy, dx  # step between stripes
        half = _CANVAS
        c = _CANVAS / 2
        step = width + gap
        for i in range(-int(half / step) - 2, int(half / step) + 3):
            ox, oy = c + nx * i * step, c + ny * i * step
            draw.line([(ox - dx * half, oy - dy * half), (ox + dx * half, oy + dy * half)], fill=255,
                      width=max(2, round(width)))
    elif ident.pattern == "dotted":
        radius, spacing, staggered = ident.dots
        rows = int(_CANVAS / spacing) + 2
        for r in range(rows):
            shift = spacing / 2 if staggered and r % 2 else 0.0
            y = r * spacing
            for k in range(rows + 1):
                x = k * spacing + shift
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    elif ident.pattern == "checked":
        cell, share = ident.check
        band = cell * share
        vertical = Image.new("L", size, 0)
        vdraw = ImageDraw.Draw(vertical)
        n = int(_CANVAS / cell) + 2
        for i in range(n):
            vdraw.rectangle((i * cell, 0, i * cell + band, _CANVAS), fill=120)
            draw.rectangle((0, i * cell, _CANVAS, i * cell + band), fill=120)
        # Crossings of both bands are solid, single bands are half-tone: a tartan look.
        mask = ImageChops.add(mask, vertical)
    return Image.composite(ink, base, mask)


class _Painter:
    """Draws one product onto a transparent canvas, in unit-box coordinates.

    The canvas is premultiplied RGBa: drawing is not anti-aliased, so every pixel is
    either opaque or (0, 0, 0, 0) and the two conventions agree; keeping the premultiplied
    mode lets the photo step resample without converting.
    """

    def __init__(self, ident: _Identity):
        self.ident = ident
        self.layer = Image.new("RGBa", (_CANVAS, _CANVAS), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.layer)
        self.fabric = _pattern_image(ident)
        shade = ident.shade
        # Seams and outlines: darker than the fabric, lighter on black so they still show.
        self.line_rgb = _mix(shade, (255, 255, 255), 0.35) if _luma(shade) < 50 else _mix(shade, (0, 0, 0), 0.45)
        self.inside_rgb = _mix(shade, (0, 0, 0), 0.55) if _luma(shade) > 50 else _mix(shade, (255, 255, 255), 0.18)

    def body(self, *shapes: Shape) -> None:
        """Fill shapes with the item's fabric (colour + pattern) and outline them."""
        mask = Image.new("L", (_CANVAS, _CANVAS), 0)
        mdraw = ImageDraw.Draw(mask)
        for s in shapes:
            _draw_shape(mdraw, s, fill=255)
        self.layer.paste(self.fabric, (0, 0), mask)
        for s in shapes:
            _draw_shape(self.draw, s, fill=None, outline=self.line_rgb + (255,), width=4)

    def solid(self, shape: Shape, rgb: RGB, outline: bool = True) -> None:
        out = _mix(rgb, (0, 0, 0), 0.45) + (255,) if outline else None
        _draw_shape(self.draw, shape, fill=rgb + (255,), outline=out, width=3 if outline else 0)

    def line(self, points: Sequence[tuple[float, float]], rgb: RGB | None = None, width: int = 4) -> None:
        self.draw.line(_pts(points), fill=(rgb or self.line_rgb) + (255,), width=width, joint="curve")

    def arc(self, box: tuple[float, float, float, float], a0: float, a1: float, rgb: RGB, width: int) -> None:
        self.draw.arc(_box(*box), a0, a1, fill=rgb + (255,), width=width)

    def logo(self, anchor: tuple[float, float], scale: float = 1.0) -> None:
        ident = self.ident
        cx, cy = anchor[0] + ident.logo_offset[0], anchor[1] + ident.logo_offset[1]
        r = ident.logo_size * scale / 2
        rgb = ident.logo_rgb
        shape = ident.logo_shape
        if shape == "circle":
            self.solid(("ellipse", (cx - r, cy - r, cx + r, cy + r)), rgb)
        elif shape == "square":
            self.solid(("poly", [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]), rgb)
        elif shape == "triangle":
            self.solid(("poly", [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]), rgb)
        elif shape == "diamond":
            self.solid(("poly", [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]), rgb)
        elif shape == "star":
            pts = []
            for i in range(10):
                rr = r if i % 2 == 0 else r * 0.45
                a = -math.pi / 2 + i * math.pi / 5
                pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
            self.solid(("poly", pts), rgb)
        else:  # bar: a short swoosh-like band
            self.solid(("poly", [(cx - r * 1.4, cy + r * 0.2), (cx + r * 1.4, cy - r * 0.5),
                                 (cx + r * 1.4, cy - r * 0.1), (cx - r * 1.4, cy + r * 0.6)]), rgb)


def _mirror(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(1 - x, y) for x, y in points]


def _draw_down_jacket(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    w = 0.54 + 0.06 * a
    top, bottom = 0.16, 0.88 + 0.05 * b
    xl, xr = 0.5 - w / 2, 0.5 + w / 2
    sleeve_w = 0.15 + 0.03 * c
    left_sleeve = [(xl + 0.02, top + 0.01), (xl - 0.02, top + 0.02), (xl - 0.16 - sleeve_w * 0.3, 0.80),
                   (xl - 0.16 + sleeve_w * 0.7, 0.82), (xl + 0.02, top + 0.22)]
    p.body(("poly", left_sleeve), ("poly", _mirror(left_sleeve)))
    p.body(("poly", [(xl, top), (xr, top), (xr + 0.02, bottom), (xl - 0.02, bottom)]))
    for i in range(1, p.ident.details + 1):  # quilting
        y = top + (bottom - top) * i / (p.ident.details + 1)
        p.line([(xl, y), (xr, y)])
        ys = top + 0.06 + (0.80 - top) * i / (p.ident.details + 1)
        p.line([(xl - 0.03 - 0.12 * (ys - top) / 0.64, ys), (xl + 0.01 - 0.02 * (ys - top), ys + 0.01)])
        p.line([(1 - (xl - 0.03 - 0.12 * (ys - top) / 0.64), ys), (1 - (xl + 0.01 - 0.02 * (ys - top)), ys + 0.01)])
    cuff = 0.035
    for pts in ([(xl - 0.16 - sleeve_w * 0.3, 0.80 - cuff), (xl - 0.16 + sleeve_w * 0.7, 0.82 - cuff),
                 (xl - 0.16 + sleeve_w * 0.7, 0.82), (xl - 0.16 - sleeve_w * 0.3, 0.80)],):
        p.solid(("poly", pts), p.ident.accent)
        p.solid(("poly", _mirror(pts)), p.ident.accent)
    if d > 0:  # hem band
        p.solid(("poly", [(xl - 0.015, bottom - 0.05), (xr + 0.015, bottom - 0.05), (xr + 0.02, bottom),
                          (xl - 0.02, bottom)]), p.ident.accent)
    p.solid(("rrect", (0.36, 0.07, 0.64, 0.21), 0.03), p.ident.accent)  # stand collar
    p.line([(0.5, 0.21), (0.5, bottom)], rgb=_mix(p.ident.accent, (0, 0, 0), 0.2), width=6)  # zip
    p.logo((0.5 + w / 4, 0.30))


def _draw_t_shirt(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    w = 0.50 + 0.06 * a
    hem = 0.92 + 0.05 * b
    sl = 0.17 + 0.04 * c
    xl = 0.5 - w / 2
    half = [(0.40, 0.10), (xl, 0.16), (xl - sl, 0.36), (xl - sl + 0.10, 0.45), (xl, 0.38), (xl, hem)]
    p.body(("poly", half + list(reversed(_mirror(half)))))
    cuff = [(xl - sl, 0.36), (xl - sl + 0.10, 0.45), (xl - sl + 0.12, 0.42), (xl - sl + 0.025, 0.335)]
    p.solid(("poly", cuff), p.ident.accent)
    p.solid(("poly", _mirror(cuff)), p.ident.accent)
    if d > 0:  # contrast hem
        p.solid(("poly", [(xl, hem - 0.05), (1 - xl, hem - 0.05), (1 - xl, hem), (xl, hem)]), p.ident.accent)
    p.solid(("ellipse", (0.38, 0.04, 0.62, 0.20)), p.ident.accent)  # collar rib
    p.solid(("ellipse", (0.41, 0.06, 0.59, 0.17)), p.inside_rgb, outline=False)
    p.logo((0.5, 0.38), scale=1.6)


def _draw_dress(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    flare = 0.30 + 0.08 * a
    hem = 0.95 + 0.04 * b
    waist = 0.40 + 0.03 * c
    p.solid(("poly", [(0.38, 0.02), (0.41, 0.02), (0.42, 0.12), (0.39, 0.12)]), p.ident.accent)  # straps
    p.solid(("poly", _mirror([(0.38, 0.02), (0.41, 0.02), (0.42, 0.12), (0.39, 0.12)])), p.ident.accent)
    hem_pts = [(0.5 + flare * math.cos(t), hem - 0.04 + 0.04 * math.sin(t))
               for t in np.linspace(0.0, math.pi, 9)]
    p.body(("poly", [(0.37, 0.10), (0.63, 0.10), (0.61, waist), (0.39, waist)]),
           ("poly", [(0.39, waist), (0.61, waist)] + hem_pts))
    if d > 0:  # hem trim
        p.line(hem_pts, rgb=p.ident.accent, width=14)
    p.solid(("poly", [(0.44, 0.10), (0.56, 0.10), (0.5, 0.19)]), p.inside_rgb, outline=False)  # V neck
    p.solid(("rrect", (0.38, waist - 0.025, 0.62, waist + 0.025), 0.01), p.ident.accent)  # belt
    for i in range(1, p.ident.details):  # folds
        t = i / p.ident.details
        p.line([(0.40 + 0.2 * t, waist + 0.04), (0.5 - flare * 0.9 + 2 * flare * 0.9 * t, hem - 0.04)], width=3)
    p.logo((0.5, waist + 0.25))


def _draw_trousers(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    hw = 0.18 + 0.04 * a  # hem width of a leg
    top_w = 0.22 + 0.03 * c
    hem = 0.96 + 0.03 * b
    left = [(0.5 - top_w, 0.12), (0.5, 0.12), (0.5, 0.32), (0.5 - 0.025, hem), (0.5 - 0.025 - hw, hem)]
    p.body(("poly", left), ("poly", _mirror(left)))
    if d > 0:  # turned-up cuffs
        cuff = [(0.5 - 0.025 - hw, hem - 0.05), (0.5 - 0.025, hem - 0.05), (0.5 - 0.025, hem), (0.5 - 0.025 - hw, hem)]
        p.solid(("poly", cuff), p.ident.accent)
        p.solid(("poly", _mirror(cuff)), p.ident.accent)
    p.solid(("rrect", (0.5 - top_w, 0.05, 0.5 + top_w, 0.13), 0.01), p.ident.accent)  # waistband
    p.line([(0.5, 0.13), (0.5, 0.30)])
    p.line([(0.5 + 0.02, 0.13), (0.5 + 0.02, 0.26), (0.5, 0.30)], width=3)  # fly
    p.line([(0.5 - top_w + 0.02, 0.16), (0.5 - top_w + 0.09, 0.26)], width=3)  # pockets
    p.line([(0.5 + top_w - 0.02, 0.16), (0.5 + top_w - 0.09, 0.26)], width=3)
    p.logo((0.5 + top_w * 0.55, 0.40), scale=0.8)


def _draw_sneakers(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    st = 0.74  # top of the sole
    h = 0.36 + 0.06 * a  # upper height at the heel
    toe = 0.93 + 0.04 * b
    sole_bot = st + 0.13 + 0.03 * c
    tongue = (0.50, st - h - 0.10)
    vamp = (0.74, st - 0.22)
    upper = [(0.05, st), (0.05, st - h), (0.15, st - h - 0.06), (0.33, st - h + 0.02), (0.41, st - h - 0.13),
             tongue, vamp, (toe - 0.06, st - 0.12), (toe, st)]
    p.body(("poly", upper))
    p.solid(("poly", [(0.03, st), (toe + 0.02, st), (toe + 0.04, (st + sole_bot) / 2),
                      (toe - 0.02, sole_bot), (0.08, sole_bot), (0.02, (st + sole_bot) / 2)]), p.ident.accent)
    p.solid(("poly", [vamp, (toe - 0.06, st - 0.12), (toe, st), (0.76, st), (0.72, st - 0.12)]),
            p.inside_rgb)  # toe cap
    if d > 0:  # heel counter in the accent colour
        p.solid(("poly", [(0.05, st), (0.05, st - h), (0.15, st - h - 0.06), (0.20, st - h * 0.4), (0.16, st)]),
                p.ident.accent)
    p.solid(("ellipse", (0.10, st - h - 0.05, 0.36, st - h + 0.05)), p.inside_rgb, outline=False)  # opening
    lace_rgb = _mix(p.ident.accent, (255, 255, 255), 0.5)
    tx, ty = vamp[0] - tongue[0], vamp[1] - tongue[1]
    norm = math.hypot(tx, ty)
    nx, ny = ty / norm * 0.045, -tx / norm * 0.045  # across the throat
    for i in range(p.ident.details):  # laces across the throat line
        t = (i + 0.6) / (p.ident.details + 0.4)
        x = tongue[0] + tx * t - nx * 1.2
        y = tongue[1] + ty * t - ny * 1.2
        p.line([(x - nx, y - ny), (x + nx, y + ny)], rgb=lace_rgb, width=6)
    p.logo((0.28, st - h / 2), scale=1.6)


def _draw_boots(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    shaft_top = 0.06 + 0.08 * a
    toe = 0.88 + 0.04 * b
    shaft_w = 0.28 + 0.03 * c
    upper = [(0.20, shaft_top), (0.20 + shaft_w, shaft_top), (0.22 + shaft_w, 0.56), (toe - 0.10, 0.66),
             (toe, 0.74), (toe, 0.84), (0.18, 0.84), (0.19, 0.50)]
    p.body(("poly", upper))
    if d > 0:  # toe cap
        p.solid(("poly", [(toe - 0.16, 0.69), (toe - 0.10, 0.66), (toe, 0.74), (toe, 0.84), (toe - 0.18, 0.84)]),
                p.ident.accent)
    p.solid(("rrect", (0.16, 0.84, toe + 0.02, 0.92), 0.015), p.ident.accent)  # sole
    p.solid(("rrect", (0.16, 0.80, 0.31, 0.95), 0.01), _mix(p.ident.accent, (0, 0, 0), 0.3))  # heel
    p.solid(("rrect", (0.17, shaft_top - 0.05, 0.25, shaft_top + 0.06), 0.015), p.ident.accent)  # pull tab
    for i in range(p.ident.details):  # laces / buckles along the front
        y = shaft_top + 0.08 + (0.52 - shaft_top) * i / max(1, p.ident.details - 1)
        p.line([(0.16 + shaft_w, y), (0.22 + shaft_w, y + 0.02)], rgb=p.ident.accent, width=6)
    p.logo((0.32, 0.70))


def _draw_handbag(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    w = 0.34 + 0.05 * a
    top = 0.36 + 0.05 * b
    p.arc((0.5 - w * 0.55, 0.06, 0.5 + w * 0.55, top + 0.28), 180, 360, p.ident.accent, 16)  # handle
    body = [(0.5 - w * 0.8, top), (0.5 + w * 0.8, top), (0.5 + w + 0.04 * c, 0.90), (0.5 - w - 0.04 * c, 0.90)]
    p.body(("poly", body))
    flap = [(0.5 - w * 0.8, top), (0.5 + w * 0.8, top), (0.5 + w * 0.84, top + 0.16), (0.5, top + 0.24),
            (0.5 - w * 0.84, top + 0.16)]
    p.body(("poly", flap))
    if d > 0:  # leather corner patches
        bw = w + 0.04 * c
        t = (0.76 - top) / (0.90 - top)
        side = (0.5 - w * 0.8) + t * ((0.5 - bw) - (0.5 - w * 0.8))  # the bag's side edge at y = 0.76
        corner = [(0.5 - bw, 0.90), (0.5 - bw + 0.14, 0.90), (side, 0.76)]
        p.solid(("poly", corner), p.ident.accent)
        p.solid(("poly", _mirror(corner)), p.ident.accent)
    p.solid(("rrect", (0.46, top + 0.19, 0.54, top + 0.27), 0.01), p.ident.accent)  # clasp
    p.line([(0.5 - w - 0.02, 0.86), (0.5 + w + 0.02, 0.86)], width=3)
    p.logo((0.5 + w * 0.5, top + 0.42))


def _draw_backpack(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    w = 0.30 + 0.04 * a
    top = 0.12 + 0.04 * b
    p.arc((0.42, top - 0.09, 0.58, top + 0.06), 180, 360, p.ident.accent, 12)  # grab loop
    strap = [(0.5 - w - 0.02, top + 0.10), (0.5 - w - 0.07, top + 0.14), (0.5 - w - 0.07, 0.78),
             (0.5 - w + 0.02, 0.84)]
    p.solid(("poly", strap), p.ident.accent)
    p.solid(("poly", _mirror(strap)), p.ident.accent)
    p.body(("rrect", (0.5 - w, top, 0.5 + w, 0.92), 0.10))
    if d > 0:  # reinforced bottom panel
        p.solid(("rrect", (0.5 - w, 0.84, 0.5 + w, 0.92), 0.04), p.ident.accent)
    pocket_top = 0.54 + 0.05 * c
    p.body(("rrect", (0.5 - w * 0.72, pocket_top, 0.5 + w * 0.72, 0.88), 0.05))
    p.arc((0.5 - w * 0.85, top + 0.05, 0.5 + w * 0.85, top + 0.40), 200, 340, p.ident.accent, 6)  # zip
    p.line([(0.5 - w * 0.62, pocket_top + 0.05), (0.5 + w * 0.62, pocket_top + 0.05)],
           rgb=p.ident.accent, width=5)
    p.logo((0.5, (top + pocket_top) / 2 + 0.06), scale=1.2)


def _draw_hat(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    dome_h = 0.46 + 0.06 * a
    brim = 0.30 + 0.05 * b
    base = 0.72
    x0, x1 = 0.02, 0.66
    top = base - dome_h
    p.body(("chord", (x0, top, x1, base + dome_h), 180, 360))
    tip = x1 + brim
    p.solid(("poly", [(x1 - 0.14, base - 0.06), (x1 + brim * 0.5, base - 0.03 + 0.02 * c),
                      (tip, base + 0.03 + 0.03 * c), (tip - 0.03, base + 0.09 + 0.02 * c),
                      (x1 + brim * 0.4, base + 0.10), (x1 - 0.12, base + 0.05)]), p.ident.accent)  # brim
    p.solid(("rrect", (x0, base - 0.05, x1, base + 0.015), 0.01), p.inside_rgb)  # sweatband
    if d > 0:  # a contrasting band above the sweatband
        p.solid(("rrect", (x0 + 0.01, base - 0.11, x1 - 0.01, base - 0.05), 0.01), p.ident.accent)
    apex = ((x0 + x1) / 2, top + 0.01)
    for i in range(1, 3):  # panel seams
        p.line([apex, (x0 + (x1 - x0) * i / 3, base - 0.05)], width=3)
    p.solid(("ellipse", (apex[0] - 0.035, top - 0.04, apex[0] + 0.035, top + 0.03)), p.ident.accent)  # button
    p.logo((apex[0] + 0.08, base - dome_h * 0.45), scale=1.6)


def _draw_watch(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    sw = 0.17 + 0.03 * a  # half strap width
    p.body(("rrect", (0.5 - sw, 0.0, 0.5 + sw, 0.40), 0.03), ("rrect", (0.5 - sw, 0.60, 0.5 + sw, 1.0), 0.03))
    for y in (0.72, 0.80, 0.88):  # strap holes
        p.solid(("ellipse", (0.485, y - 0.015, 0.515, y + 0.015)), p.inside_rgb, outline=False)
    r = 0.22 + 0.03 * b
    metal = p.ident.accent
    if c > 0.3:
        p.solid(("rrect", (0.5 - r, 0.5 - r, 0.5 + r, 0.5 + r), 0.05), metal)
    else:
        p.solid(("ellipse", (0.5 - r, 0.5 - r, 0.5 + r, 0.5 + r)), metal)
    p.solid(("rrect", (0.5 + r - 0.01, 0.46, 0.5 + r + 0.05, 0.54), 0.01), metal)  # crown
    if d > 0:  # a dark bezel ring
        p.solid(("ellipse", (0.5 - r + 0.015, 0.5 - r + 0.015, 0.5 + r - 0.015, 0.5 + r - 0.015)), (40, 40, 46))
    f = r - 0.035
    p.solid(("ellipse", (0.5 - f, 0.5 - f, 0.5 + f, 0.5 + f)), p.ident.face_rgb)
    ink = (20, 20, 24) if _luma(p.ident.face_rgb) > 120 else (235, 235, 235)
    for i in range(12):
        t = i * math.pi / 6
        p.line([(0.5 + f * 0.78 * math.cos(t), 0.5 + f * 0.78 * math.sin(t)),
                (0.5 + f * 0.92 * math.cos(t), 0.5 + f * 0.92 * math.sin(t))], rgb=ink, width=4)
    hour, minute = p.ident.hands
    p.line([(0.5, 0.5), (0.5 + f * 0.5 * math.cos(hour), 0.5 + f * 0.5 * math.sin(hour))], rgb=ink, width=8)
    p.line([(0.5, 0.5), (0.5 + f * 0.75 * math.cos(minute), 0.5 + f * 0.75 * math.sin(minute))], rgb=ink, width=5)
    p.logo((0.5, 0.5 - f * 0.45), scale=0.6)


def _draw_hoodie(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    w = 0.52 + 0.05 * a
    bottom = 0.90 + 0.04 * b
    xl, xr = 0.5 - w / 2, 0.5 + w / 2
    p.body(("ellipse", (0.33, 0.02, 0.67, 0.30)))  # hood
    lining = p.ident.accent if d > 0 else p.inside_rgb
    p.solid(("ellipse", (0.38, 0.06, 0.62, 0.26)), lining)
    sleeve = [(xl + 0.02, 0.17), (xl - 0.03, 0.19), (xl - 0.17, 0.80), (xl - 0.06, 0.82), (xl + 0.02, 0.40)]
    p.body(("poly", sleeve), ("poly", _mirror(sleeve)),
           ("poly", [(xl, 0.17), (xr, 0.17), (xr, bottom), (xl, bottom)]))
    rib = p.ident.accent
    p.solid(("poly", [(xl - 0.17, 0.80), (xl - 0.06, 0.82), (xl - 0.065, 0.86), (xl - 0.175, 0.84)]), rib)
    p.solid(("poly", _mirror([(xl - 0.17, 0.80), (xl - 0.06, 0.82), (xl - 0.065, 0.86), (xl - 0.175, 0.84)])), rib)
    p.solid(("rrect", (xl, bottom - 0.05, xr, bottom), 0.01), rib)  # waist rib
    pocket_w = 0.16 + 0.03 * c
    p.line([(0.5 - pocket_w, 0.62), (0.5 - pocket_w * 0.7, bottom - 0.10), (0.5 + pocket_w * 0.7, bottom - 0.10),
            (0.5 + pocket_w, 0.62), (0.5 - pocket_w, 0.62)], width=4)
    for x in (0.46, 0.54):  # drawstrings
        p.line([(x, 0.24), (x, 0.42)], rgb=rib, width=6)
    p.logo((0.5, 0.50), scale=1.3)


def _draw_skirt(p: _Painter) -> None:
    a, b, c, d = p.ident.prop
    flare = 0.34 + 0.07 * a
    hem = 0.82 + 0.08 * b
    top_w = 0.20 + 0.03 * c
    hem_pts = [(0.5 + flare * math.cos(t), hem - 0.03 + 0.03 * math.sin(t)) for t in np.linspace(0.0, math.pi, 9)]
    p.body(("poly", [(0.5 - top_w, 0.18), (0.5 + top_w, 0.18)] + hem_pts))
    if d > 0:  # hem trim
        p.line(hem_pts, rgb=p.ident.accent, width=14)
    p.solid(("rrect", (0.5 - top_w - 0.01, 0.10, 0.5 + top_w + 0.01, 0.19), 0.01), p.ident.accent)  # waistband
    for i in range(1, p.ident.details + 2):  # pleats fan out from the waist
        t = i / (p.ident.details + 2)
        p.line([(0.5 - top_w + 2 * top_w * t, 0.20), (0.5 - flare + 2 * flare * t, hem - 0.01)], width=3)
    p.logo((0.5 + top_w * 0.5, 0.30), scale=0.8)


_DRAWERS: dict[str, Callable[[_Painter], None]] = {
    "down_jacket": _draw_down_jacket, "t_shirt": _draw_t_shirt, "dress": _draw_dress,
    "trousers": _draw_trousers, "sneakers": _draw_sneakers, "boots": _draw_boots,
    "handbag": _draw_handbag, "backpack": _draw_backpack, "hat": _draw_hat, "watch": _draw_watch,
    "hoodie": _draw_hoodie, "skirt": _draw_skirt,
}


def _product_layer(ident: _Identity) -> Image.Image:
    """The product alone (RGBa, transparent around it, 2x size), identical in every photo."""
    painter = _Painter(ident)
    _DRAWERS[ident.category](painter)
    return painter.layer


# --------------------------------------------------------------------------- photographing


def _background(rng: np.random.Generator) -> np.ndarray:
    """A random backdrop, float32 [3, H, W] in 0..255.

    Channels first throughout the photo pipeline: numpy broadcasts a [H, W] mask over
    [3, H, W] several times faster than over a trailing axis of length 3.
    """
    size = IMAGE_SIZE
    h = float(rng.random())
    # Mostly pale, low-saturation backdrops, as in shop photography; never a second product colour.
    c0 = _hsv_rgb(h, float(rng.uniform(0.0, 0.25)), float(rng.uniform(0.6, 1.0)))
    c1 = _hsv_rgb(h + float(rng.uniform(-0.15, 0.15)), float(rng.uniform(0.0, 0.25)), float(rng.uniform(0.55, 1.0)))
    kind = int(rng.integers(5))
    a0 = np.array(c0, np.float32)[:, None, None]
    a1 = np.array(c1, np.float32)[:, None, None]
    arr = np.empty((3, size, size), np.float32)
    if kind == 0:  # seamless studio paper
        arr[:] = a0
    elif kind == 1:  # vertical gradient
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
        arr[:] = a0 + (a1 - a0) * ramp
    elif kind == 2:  # wall and floor
        horizon = int(size * rng.uniform(0.6, 0.82))
        arr[:, :horizon] = a0
        arr[:, horizon:] = a1
    elif kind == 3:  # blotchy texture (cloth, plaster)
        small = (rng.uniform(-20, 20, (6, 6, 3)) + a0[:, 0, 0]).clip(0, 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
        arr[:] = big.transpose(2, 0, 1)
    else:  # fine grain (paper, wood board): streaks of noise stretched along x
        grain = rng.normal(0.0, 7.0, (size, size // 8)).astype(np.float32)
        arr[:] = a0 + np.repeat(grain, 8, axis=1)[None]
    return arr


def _photograph(product: Image.Image, rng: np.random.Generator, quality: tuple[int, int],
                noise: tuple[float, float]) -> tuple[Image.Image, int]:
    """One photo of ``product`` (new background, framing, light, noise) and its JPEG quality."""
    scale = float(rng.uniform(0.9, 1.1))
    angle = math.radians(float(rng.uniform(-8.0, 8.0)))
    dx, dy = (float(v) for v in rng.uniform(-14.0, 14.0, 2))
    arr = _background(rng)
    # Rotation, scale and shift in one nearest-neighbour resampling of the 2x drawing,
    # then a 2x2 box average: 4-sample supersampling for the price of one cheap pass.
    # The drawing is premultiplied (RGBa), so edges do not darken in the average.
    c = _CANVAS / 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    sx, sy = c + 2 * dx, c + 2 * dy
    matrix = (cos, sin, c - cos * sx - sin * sy, -sin, cos, c + sin * sx - cos * sy)
    obj = product.transform((_CANVAS, _CANVAS), Image.AFFINE, matrix, resample=Image.NEAREST).reduce(2)
    # A soft drop shadow so that the product sits on the surface rather than floating.
    blur = obj.getchannel(3).resize((IMAGE_SIZE // 8, IMAGE_SIZE // 8), Image.BILINEAR)
    blur = blur.filter(ImageFilter.GaussianBlur(1.5)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    keep = np.ones((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    keep[7:, 5:] -= np.asarray(blur, np.float32)[:-7, :-5] * (0.35 / 255.0)
    rgba = np.asarray(obj).transpose(2, 0, 1).astype(np.float32)
    keep *= 1.0 - rgba[3] / 255.0
    arr *= keep
    arr += rgba[:3]
    gain = float(rng.uniform(0.86, 1.12))
    cast = (1.0 + rng.uniform(-0.04, 0.04, 3)).astype(np.float32)[:, None, None]
    theta, amp = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.0, 0.14))
    grid = np.linspace(-0.5, 0.5, IMAGE_SIZE, dtype=np.float32)
    light = gain * (1.0 + amp * (grid[None, :] * math.cos(theta) + grid[:, None] * math.sin(theta)))
    sigma = float(rng.uniform(*noise))
    arr *= light
    arr *= cast
    # Luminance noise only: most of what a sensor adds, at a third of the cost.
    arr += rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32) * sigma + 0.5  # +0.5: cast rounds
    np.clip(arr, 0.0, 255.0, out=arr)
    img = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8).transpose(1, 2, 0)), "RGB")
    return img, int(rng.integers(quality[0], quality[1] + 1))


def _save_jpeg(photo: tuple[Image.Image, int], path: Path) -> None:
    img, quality = photo
    img.save(path, "JPEG", quality=quality)


# --------------------------------------------------------------------------- titles


def _clean(text: str) -> str:
    text = " ".join(text.split())
    return text.replace(" ,", ",").replace("( ", "(").replace(" )", ")").replace("()", "").strip(" ,-|")


def _title_en(rng: np.random.Generator, ident: _Identity, gender: str | None, brand: str) -> str:
    cat = _pick(rng, _CATEGORY[ident.category].en)
    col = _pick(rng, _COLOUR[ident.colour].en)
    pat = _pick(rng, _PATTERN[ident.pattern].en)
    adj, noun, for_ = _GENDER_EN[gender] if gender else ("", "", "")
    templates = (
        lambda: f"{brand} {adj} {col} {pat} {cat}",
        lambda: f"{col} {pat} {cat}" + (f", {noun}" if noun else ""),
        lambda: f"{adj} {col} {cat}" + (f", {pat}" if pat else ""),
        lambda: f"{pat} {cat} in {col}" + (f" for {for_}" if for_ else "") + f" - {brand}",
        lambda: f"{brand} {cat}, {col}" + (f", {pat}" if pat else "") + (f", {noun}" if noun else ""),
    )
    return _clean(_pick(rng, templates)())


def _title_zh(rng: np.random.Generator, ident: _Identity, gender: str | None, brand: str) -> str:
    cat = _pick(rng, _CATEGORY[ident.category].zh)
    col = _pick(rng, _COLOUR[ident.colour].zh)
    pat = _pick(rng, _PATTERN[ident.pattern].zh)
    g = _pick(rng, _GENDER_ZH[gender]) if gender else ""
    templates = (
        lambda: f"{brand} {g}{col}{pat}{cat}",
        lambda: f"{col}{pat}{cat} {g}",
        lambda: f"{g}{cat} {col} {pat}",
        lambda: f"{brand}{col}{cat}" + (f"，{pat}款" if pat else ""),
        lambda: f"{pat}{cat}{g} {col} {brand}",
    )
    return _clean(_pick(rng, templates)())


def _titles(rng: np.random.Generator, ident: _Identity, gender: str | None, brand: str) -> tuple[str, str, list[str]]:
    """Primary language, title and alt titles (other language, then a synonym variant)."""
    lang = "zh" if rng.random() < 1 / 3 else "en"
    own, other = (_title_zh, _title_en) if lang == "zh" else (_title_en, _title_zh)
    title = own(rng, ident, gender, brand)
    alt_other = other(rng, ident, gender, brand)
    variant = title
    for _ in range(8):  # a few draws almost always give a different wording
        variant = own(rng, ident, gender, brand)
        if variant != title:
            break
    return lang, title, [alt_other, variant]


# --------------------------------------------------------------------------- queries


_TEXT_QUERY_EN = ("{col} {cat}", "{cat} {col}", "looking for a {col} {cat}", "{col} {cat} please",
                  "any {col} {cat}?", "show me {col} {cat}")
_TEXT_QUERY_ZH = ("{col}{cat}", "{cat} {col}", "想买{col}的{cat}", "{col}{cat}推荐", "有没有{col}{cat}")
_EDIT_QUERY_EN = ("like this but in {col}", "same style in {col}", "this one in {col} please",
                  "do you have it in {col}?", "the {col} version of this")
_EDIT_QUERY_ZH = ("同款{col}", "有{col}的吗", "这款的{col}", "换成{col}", "要{col}款")


def _text_query(rng: np.random.Generator, category: str, colour: str) -> tuple[str, str]:
    cat, col = _CATEGORY[category], _COLOUR[colour]
    if rng.random() < 0.4:
        words = cat.query_zh if rng.random() < 0.35 else cat.zh
        text = _pick(rng, _TEXT_QUERY_ZH).format(col=_pick(rng, col.zh), cat=_pick(rng, words))
        return "zh", text
    words = cat.query_en if rng.random() < 0.35 else cat.en
    text = _pick(rng, _TEXT_QUERY_EN).format(col=_pick(rng, col.en), cat=_pick(rng, words))
    return "en", text


def _edit_query(rng: np.random.Generator, colour: str) -> tuple[str, str]:
    col = _COLOUR[colour]
    if rng.random() < 0.4:
        return "zh", _pick(rng, _EDIT_QUERY_ZH).format(col=_pick(rng, col.zh))
    return "en", _pick(rng, _EDIT_QUERY_EN).format(col=_pick(rng, col.en))


# --------------------------------------------------------------------------- public API


def _item_id(index: int) -> str:
    return f"p{index:06d}"


def _validate(n: int, seed: int, n_queries: int, first_query: int = 0) -> None:
    if not isinstance(n, int) or not MIN_ITEMS <= n <= 999_999:
        raise InputError(f"demo catalogue: n={n!r} is out of range; pass an integer from {MIN_ITEMS} "
                         "(every category needs two colours) to 999999")
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"demo catalogue: seed={seed!r} must be a non-negative integer")
    if not isinstance(n_queries, int) or not 0 <= n_queries <= 99_999:
        raise InputError(f"demo catalogue: n_queries={n_queries!r} must be an integer from 0 to 99999")
    if not isinstance(first_query, int) or not 0 <= first_query <= 99_999 - n_queries:
        raise InputError(f"demo catalogue: first_query={first_query!r} must be an integer from 0 to "
                         f"{99_999 - n_queries} (99999 queries at most, counting the skipped ones)")


def _write_jsonl(rows: list[dict], path: Path) -> None:
    # Written beside the target and renamed: a reader never sees half a file.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _catalog_row(seed: int, index: int) -> tuple[dict, _Identity]:
    ident = _identity(seed, index)
    # Text attributes have their own stream so titles can change without moving pixels.
    rng = _rng(seed, _STREAM_ITEM_TEXT, index)
    cat = _CATEGORY[ident.category]
    gender = _pick(rng, cat.genders)
    brand = _pick(rng, _BRANDS)
    lo, hi = cat.price
    price = round(float(rng.uniform(lo, hi)), 0) - 0.01
    lang, title, alt_titles = _titles(rng, ident, gender, brand)
    item_id = _item_id(index)
    row = {
        "id": item_id,
        "title": title,
        "lang": lang,
        "image": f"{IMAGES_DIR}/{item_id}.jpg",
        "alt_titles": alt_titles,
        "category": ident.category,
        "colour": ident.colour,
        "pattern": ident.pattern,
        "gender": gender,
        "price": round(price, 2),
        "brand": brand,
    }
    return row, ident


def _queries(seed: int, n: int, queries_range: range, rows: list[dict], out_dir: Path,
             tick: Callable[[], None]) -> list[dict]:
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    queries = []
    for q in queries_range:
        rng = _rng(seed, _STREAM_QUERY, q)
        qid = f"q{q + 1:05d}"
        kind = QUERY_KINDS[q % len(QUERY_KINDS)]
        index = int(rng.integers(n))
        item = rows[index]
        category = item["category"]
        query: dict = {"qid": qid, "kind": kind}
        if kind == "text":
            lang, text = _text_query(rng, category, item["colour"])
            query.update(text=text, lang=lang)
            relevant = {r["id"]: 2 if r["colour"] == item["colour"] else 1 for r in by_category[category]}
        else:
            path = out_dir / QUERY_IMAGES_DIR / f"{qid}.jpg"
            # Same identity, fresh framing/background/light from the query's own stream.
            photo = _photograph(_product_layer(_identity(seed, index)), rng, quality=(70, 92), noise=(1.5, 6.0))
            _save_jpeg(photo, path)
            query["image"] = f"{QUERY_IMAGES_DIR}/{qid}.jpg"
            if kind == "image":
                query["lang"] = "en"
                relevant = {item["id"]: 2}
            else:
                others = sorted({r["colour"] for r in by_category[category]} - {item["colour"]})
                wanted = _pick(rng, others)
                lang, text = _edit_query(rng, wanted)
                query.update(text=text, lang=lang)
                relevant = {r["id"]: 2 if r["colour"] == wanted else 1 for r in by_category[category]}
        query["relevant"] = relevant
        queries.append(query)
        tick()
    return queries


def generate_demo_catalog(out_dir: Path, n: int = 1500, seed: int = 0, n_queries: int = 300,
                          progress: bool = False, first_query: int = 0) -> dict:
    """Draw a demo catalogue of ``n`` products and ``n_queries`` evaluation queries.

    Writes ``catalog.jsonl``, ``images/``, ``queries.jsonl`` and ``query_images/`` under
    ``out_dir`` (created if needed; files of an earlier run with the same names are
    overwritten, others are left alone).  Same ``(n, seed, n_queries)`` -> byte-identical
    files.  Query ``q`` (qid ``q{q + 1:05d}``) depends on ``(n, seed, q)`` only, so
    ``first_query`` > 0 draws further queries of the same catalogue, none shared with the
    first ``first_query``: a development set to choose settings on, apart from the
    evaluation set ``queries.jsonl`` of the default run.  Returns a summary: counts per category, colour, pattern, title language and
    query kind, and the paths written (as strings).
    """
    _validate(n, seed, n_queries, first_query)
    out_dir = Path(out_dir)
    try:
        (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (out_dir / QUERY_IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"demo catalogue: cannot create {out_dir}: {exc}; pass a writable directory") from exc

    bar = tqdm(total=n + n_queries, desc="demo catalogue", unit="img", disable=not progress)
    rows: list[dict] = []
    for index in range(n):
        row, ident = _catalog_row(seed, index)
        photo = _photograph(_product_layer(ident), _rng(seed, _STREAM_CATALOG_RENDER, index),
                            quality=(86, 95), noise=(1.0, 4.0))
        _save_jpeg(photo, out_dir / row["image"])
        rows.append(row)
        bar.update(1)
    queries = _queries(seed, n, range(first_query, first_query + n_queries), rows, out_dir,
                       lambda: bar.update(1))
    bar.close()
    _write_jsonl(rows, out_dir / CATALOG_FILE)
    _write_jsonl(queries, out_dir / QUERIES_FILE)
    logger.info("demo catalogue: %d items, %d queries in %s", n, n_queries, out_dir)
    return {
        "n_items": n,
        "n_queries": n_queries,
        "first_query": first_query,
        "seed": seed,
        "categories": dict(sorted(Counter(r["category"] for r in rows).items())),
        "colours": dict(sorted(Counter(r["colour"] for r in rows).items())),
        "patterns": dict(sorted(Counter(r["pattern"] for r in rows).items())),
        "title_languages": dict(sorted(Counter(r["lang"] for r in rows).items())),
        "query_kinds": dict(sorted(Counter(q["kind"] for q in queries).items())),
        "query_languages": dict(sorted(Counter(q["lang"] for q in queries).items())),
        "catalog": str(out_dir / CATALOG_FILE),
        "queries": str(out_dir / QUERIES_FILE),
        "images_dir": str(out_dir / IMAGES_DIR),
        "query_images_dir": str(out_dir / QUERY_IMAGES_DIR),
    }
