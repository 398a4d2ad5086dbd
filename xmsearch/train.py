"""Contrastive training of the fusion module on a catalogue's own title/photo pairs.

Encoders stay frozen; their outputs are computed once and cached (photos through ONNX
Runtime, 6x PyTorch eager on 2 CPU cores: ``benchmarks/feature_encoding.py``), so an epoch
is a few small matrix products per batch and takes seconds on 2 cores.

Each item ``i`` is anchored by its *item embedding* (title with the passage role + the
catalogue photo, the same path ``xmsearch index`` takes).  Four *query views* of the item
are pulled towards the anchor with a symmetric InfoNCE loss against the other items of
the batch:

- text: the title, an alternative title, or a short query cut from one (1-4 of its
  words in title order, sometimes behind generic shopping filler such as "looking for" /
  "同款"), with the query role; Chinese titles are cut into words learned from the
  catalogue itself (:class:`TitleWords`).  Every item of the batch whose titles have
  all the words of a text view counts as its positive too (:func:`shared_word_positives`);
- image: one of ``AUG_VIEWS`` re-shots of the photo (backdrop, framing, rotation, mirror,
  light, noise, JPEG; see :func:`xmsearch.reshoot.augment_photo`); from the second epoch on, also against a
  batch made of groups of look-alikes (nearest items in the model's own item space:
  :func:`neighbour_batches`), the near-duplicates that random batches almost never pair;
- text+image: a text view together with the augmented photo;
- edit ("like this, but ..."): the photo of ``j`` with the words of ``i``'s title that
  none of ``j``'s titles has ("red" when ``j`` is the blue one), sometimes behind a
  filler, against the anchor of ``i``; ``j`` is, of the ``EDIT_CANDIDATES`` items whose
  titles are closest to ``i``'s, the ``EDIT_VIEWS`` that lack the fewest (but at least
  one) of its words, one of them per step.  The module learns to take the kind of
  product from the photo and let the words override what they name.

The text+image and edit views are *queries* and go through the query-side cross-attention
(``query_cross``, exported as ``fusion_joint``); the anchors go through the item-side one
(``fusion_item``), and their losses do not move the anchors (``query_detach``): the item
embeddings are shaped by the text and photo views alone.  With one set of weights for
both, the edit task underfit (42% of the top-10 slots of the training items' own edit
views right) and weighting it up made every kind worse; with two and the detached
anchors, photo+text R@10 rose by 0.09 and photo R@1 by 0.06 over three seeds, text R@10
fell by 0.03 (benchmarks/results/quality_ab.md).

Nothing here depends on the demo catalogue: views come from ``title``, optional
``alt_titles`` and the image of any catalogue in the ingest format.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xmsearch.catalog import CatalogRow, alt_titles, read_catalog
from xmsearch.checkpoint import FusionCheckpoint
from xmsearch.errors import CheckpointError, InputError
from xmsearch.models.fusion import ITEM_MIX_MAX, AttentionFusion
from xmsearch.pipeline import Encoders
from xmsearch.reshoot import augment_photo

# Generic shopping-query filler, not tied to any catalogue's vocabulary.
FILLERS = ["like this but", "similar but", "same style in", "looking for", "show me",
           "something like this in", "this one in", "i want", "同款", "类似的", "想要", "找"]
TEXT_VIEWS = 6  # query-role text views cached per item
EDIT_CANDIDATES = 32  # nearest titles searched for edit partners
EDIT_VIEWS = 3  # edit views (partners) cached per item
AUG_VIEWS = 3  # augmented re-shots cached per catalogue photo


PRECISIONS = ("auto", "fp32", "bf16")
# What a checkpoint's training did beyond its TrainConfig fields, recorded in its meta and
# compared by stale_checkpoint. 2: validation holds out views of items, not items (ViewSampler).
# 3: edit views count their target's nearest items as answers (TrainConfig.edit_positives), a
# new setting whose default trains differently. 4: so do the text+photo views
# (TrainConfig.view_positives now on by default).
TRAINING_RECIPE = 4


def bf16_supported() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles).

    There, autocast to bfloat16 roughly halves the matrix products of a training step;
    elsewhere PyTorch emulates them and bf16 would be slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    probes = (getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> ``"bf16"`` where the CPU has native bfloat16, else ``"fp32"``."""
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


@dataclass
class TrainConfig:
    # 40 epochs with weight decay 0.05 against 20 with 0.01, over 3 seeds: text R@10 +0.05 to
    # +0.08, photo+text R@10 +0.06 to +0.10, photo R@1 -0.01 to +0.01; 40 epochs at 0.01 cost
    # photo R@1 0.06 on seed 0 (quality_ab.md, 2026-12-05).
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    # Initial temperature of the learnable logit scale (CLIP-style). 0.1 against 0.05: photo+text
    # R@10 +0.04 / +0.06 on two seeds, text and photo R@1 unchanged (quality_ab.md, 2026-12-04 night).
    temperature: float = 0.1
    # Share of the items whose last photo re-shot and query-worded title are kept out of training
    # for the per-epoch validation recall; every item itself is trained (train_fusion).
    val_fraction: float = 0.05
    seed: int = 0
    # 384 against 256 (bf16 steps, 3 seeds): text R@10 +0.012 to +0.034, photo+text R@10 +0.014 to
    # +0.057, photo R@1 -0.01 to +0.02, in 1.4x the training time; the served fusion graphs cost
    # 1.3-1.6x (+0.45 ms per ingested item at batch 8; quality_ab.md, fusion_width_cost.md).
    width: int = 384
    embed_dim: int = 256
    image_reduce_dim: int = 256  # frozen PCA of the regions before the trained projection
    query_cross: bool = True  # text+image queries get their own cross-attention (AttentionFusion)
    # The text+image and edit losses train the query side only: they do not move the item
    # embeddings they are matched against (photo R@1 +0.06, text R@10 -0.03 over 3 seeds).
    query_detach: bool = True
    # Stored item vector = joint + item_mix * (title-only + photo-only), renormalised
    # (AttentionFusion.item); training itself matches every query view against the joint
    # embedding. 0.5 against 0 over three seeds: text R@10 +0.04 to +0.05, photo+text R@10
    # +0.04 to +0.06 (quality_ab.md, 2026-12-04 late). Since photo queries are ranked again by
    # the photo-side vector (CatalogIndex.search_photo), which does not depend on it, 2 against
    # 0.5 on the development queries over three seeds: text R@10 0.853 -> 0.859, photo+text R@10
    # 0.755 -> 0.776, photo R@1 unchanged; 3 adds at most 0.003 (quality_ab.md, 2026-12-06 afternoon).
    item_mix: float = 2.0
    group_size: int = 4  # >1: an extra photo -> item loss on batches of look-alike groups (neighbour_batches)
    # An edit view ("the words of i that j lacks, over j's photo") names one product, i; a
    # text+image query asks for a kind in a colour, which i's nearest items (by the item
    # embeddings of the epoch before) share. With those k also counted as answers instead of
    # negatives, 4 against 0 over three seeds, evaluation / development queries: photo+text
    # R@10 +0.013 / +0.018, text R@10 +0.008 / +0.005, photo R@1 +0.006 / +0.009, in the same
    # time (quality_ab.md, 2026-12-07 late morning).
    edit_positives: int = 4
    # The text+photo views (a text view of i over a re-shot of i) count the same neighbours as
    # answers. On top of edit_positives 4, over three seeds, evaluation / development queries:
    # photo+text R@10 0.790 -> 0.802 / 0.784 -> 0.797, text R@10 +0.004 / +0.005, photo R@1
    # -0.003 / +0.001 (quality_ab.md, 2026-12-07 late morning); chosen by the development means.
    view_positives: bool = True
    # Arithmetic of the training steps: "bf16" runs them under bfloat16 autocast (weights,
    # optimiser state and the similarity logits stay fp32), "auto" picks it where the CPU
    # multiplies bfloat16 natively (bf16_supported). On the demo's 2 cores 1.6x faster per epoch
    # (train_precision.md; 1.5x over whole 40-epoch trainings with their evaluation), with
    # retrieval figures inside the seed spread over 3 seeds (text R@10 0.004-0.011 lower,
    # photo R@1 and photo+text R@10 either way; quality_ab.md, 2026-12-05 afternoon).
    precision: str = "auto"

    def __post_init__(self) -> None:
        # Checked here, before any feature is encoded: a bad setting should not cost an encoding pass.
        problems = [f"{name} must be {rule}, got {value!r}" for name, value, ok, rule in (
            ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 2, ">= 2"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("temperature", self.temperature, self.temperature > 0, "> 0"),
            ("val_fraction", self.val_fraction, 0 <= self.val_fraction < 1, "in [0, 1)"),
            ("group_size", self.group_size, self.group_size >= 1, ">= 1"),
            ("edit_positives", self.edit_positives, self.edit_positives >= 0, ">= 0"),
            ("precision", self.precision, self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("item_mix", self.item_mix, 0 <= self.item_mix <= ITEM_MIX_MAX, f"in [0, {ITEM_MIX_MAX:g}]")) if not ok]
        if problems:
            raise InputError("training settings: " + "; ".join(problems))


@dataclass
class Features:
    """Frozen-encoder outputs for every item (fp16 to keep 10k items in a few GB)."""

    ids: list[str]
    item_states: torch.Tensor  # [N, S, Ht] passage-role title
    item_mask: torch.Tensor  # [N, S]
    view_states: torch.Tensor  # [N, V, S, Ht] query-role text views
    view_mask: torch.Tensor  # [N, V, S]
    edit_states: torch.Tensor  # [N, E, S, Ht] query-role "the words of i that j lacks", E partners j
    edit_mask: torch.Tensor  # [N, E, S]
    edit_other: torch.Tensor  # [N, E] long: the item j whose photo goes with the edit words
    regions: torch.Tensor  # [N, 1 + AUG_VIEWS, R, Hi]: catalogue photo, then its re-shots
    view_words: list  # [N][V] the lower-case words of each text view, filler left out
    item_words: list  # [N] the lower-case words of all of an item's titles


@dataclass
class TrainResult:
    checkpoint: FusionCheckpoint
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    features: Features | None = None  # the frozen-encoder features it trained on


# ---------------------------------------------------------------------------- views


_WORD = re.compile(r"[\u4e00-\u9fff]+|[^\u4e00-\u9fff\s,，]+")
_CJK = re.compile(r"[\u4e00-\u9fff]+")


class TitleWords:
    """Splits titles into words, learning the words of space-less (CJK) runs from the catalogue.

    Latin-script words are what lies between spaces and commas.  Chinese is written
    without spaces, so a run such as 墨绿色格纹手提包 is cut into the catalogue's own words
    (墨绿色 / 格纹 / 手提包) by *accessor variety*: a string of 2-4 characters is a word when
    at least ``min_variety`` different characters (or a run boundary) come before it and
    after it across the catalogue's titles: 格纹 follows every colour and precedes many
    kinds of product, while 色格 is always followed by 纹 or 子.  Each run is then split into
    the sequence of words with the most ``len * log(variety)``; characters no word covers
    stay together as one unknown word.  Nothing is language- or catalogue-specific: with
    no titles to learn from, every CJK run is a single word.
    """

    def __init__(self, titles: Iterable[str] = (), max_len: int = 4, min_variety: int = 3):
        left: dict[str, set] = {}
        right: dict[str, set] = {}
        boundary = 0  # every run boundary is a new, distinct context
        for title in titles:
            for run in _CJK.findall(title):
                for n in range(2, min(max_len, len(run)) + 1):
                    for i in range(len(run) - n + 1):
                        piece = run[i:i + n]
                        boundary += 1
                        left.setdefault(piece, set()).add(run[i - 1] if i else boundary)
                        right.setdefault(piece, set()).add(run[i + n] if i + n < len(run) else -boundary)
        self.max_len = max_len
        self.score = {}
        for piece, before in left.items():
            variety = min(len(before), len(right[piece]))
            if variety >= min_variety:
                self.score[piece] = len(piece) * math.log(variety)

    def split_run(self, run: str) -> list[str]:
        """The best-scoring cut of one CJK run (Viterbi over known words and single characters)."""
        n = len(run)
        best, back = [0.0] + [-math.inf] * n, [0] * (n + 1)
        for end in range(1, n + 1):
            for start in range(max(0, end - self.max_len), end):
                gain = 0.0 if end - start == 1 else self.score.get(run[start:end])
                if gain is not None and best[start] + gain > best[end]:
                    best[end], back[end] = best[start] + gain, start
        pieces, end = [], n
        while end:
            pieces.append(run[back[end]:end])
            end = back[end]
        words, unknown = [], ""
        for piece in reversed(pieces):
            if len(piece) == 1:
                unknown += piece
                continue
            if unknown:
                words.append(unknown)
                unknown = ""
            words.append(piece)
        return words + ([unknown] if unknown else [])

    def __call__(self, title: str) -> list[str]:
        out = []
        for part in _WORD.findall(title):
            out.extend(self.split_run(part) if _CJK.fullmatch(part) else [part])
        return out or [title]


def _all_titles(row: CatalogRow) -> list[str]:
    return [row.title] + alt_titles(row)


def catalogue_words(rows: list[CatalogRow]) -> TitleWords:
    return TitleWords(t for r in rows for t in _all_titles(r))


def _word_set(row: CatalogRow, words: TitleWords) -> set[str]:
    """The lower-case words of all of an item's titles, in every language."""
    return {w.lower() for t in _all_titles(row) for w in words(t)}


def text_views(row: CatalogRow, rng: random.Random, words: TitleWords, n: int = TEXT_VIEWS) -> list[str]:
    """``n`` query-style texts for an item: its titles, then short queries cut from them.

    A short query keeps 1-4 words of one of the titles in their order ("blue down
    jacket" from "Nordvik men's blue striped down jacket"), half of the time behind
    generic shopping filler.
    """
    full = _all_titles(row)
    views = full[: min(len(full), n // 2)]
    while len(views) < n:
        src = words(rng.choice(full))
        keep = sorted(rng.sample(range(len(src)), k=min(len(src), rng.randint(1, 4))))
        text = " ".join(src[i] for i in keep)
        if rng.random() < 0.5:
            text = f"{rng.choice(FILLERS)} {text}"
        views.append(text)
    return views


@torch.no_grad()
def nearest_rows(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """[N, k] for each row of the unit vectors ``x``, the rows of highest cosine, itself excluded."""
    k = min(k, len(x) - 1)
    out = []
    for i in range(0, len(x), chunk):
        sims = x[i:i + chunk] @ x.T
        sims[torch.arange(len(sims)), torch.arange(i, i + len(sims))] = -2.0
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


@torch.no_grad()
def title_neighbours(states: torch.Tensor, mask: torch.Tensor, k: int = 5, chunk: int = 1024) -> torch.Tensor:
    """[N, k] the items whose titles are closest to each item's (mean-pooled states), itself excluded."""
    from xmsearch.models.text import mean_pool

    return nearest_rows(F.normalize(mean_pool(states.float(), mask), dim=-1), k, chunk)


def strip_filler(text: str) -> str:
    for filler in FILLERS:
        if text.startswith(filler + " "):
            return text[len(filler) + 1:]
    return text


def _missing_words(row: CatalogRow, other: CatalogRow, words: TitleWords) -> list[str]:
    """The words of ``row``'s title that none of ``other``'s titles (in any language) has."""
    theirs = _word_set(other, words)
    return [w for w in words(row.title) if w.lower() not in theirs]


def edit_partners(row: CatalogRow, candidates: list[CatalogRow], rng: random.Random, words: TitleWords,
                  n: int = 1) -> list[int]:
    """Indices of the ``n`` candidates whose titles lack the fewest of ``row``'s words, but
    at least one (ties: random): the items that differ from ``row`` in as little as a
    colour.  Candidates that lack none of them (the same product under other words) are
    only taken when no other is left."""
    counts = [len(_missing_words(row, c, words)) for c in candidates]
    left, picked = list(range(len(candidates))), []
    while left and len(picked) < n:
        low = min((counts[i] for i in left if counts[i] > 0), default=0)
        best = [i for i in left if counts[i] == low]
        picked.append(best[rng.randrange(len(best))])
        left.remove(picked[-1])
    return picked


def edit_view(row: CatalogRow, other: CatalogRow, rng: random.Random, words: TitleWords) -> str:
    """"Like <other's photo>, but <the words of row's title that other's titles lack>"."""
    diff = _missing_words(row, other, words) or words(row.title)[:2]
    text = " ".join(diff)
    return f"{rng.choice(FILLERS)} {text}" if rng.random() < 0.7 else text


# ------------------------------------------------------------------------- features


def _pad_states(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.shape[1] for s, _ in chunks)
    states = torch.cat([F.pad(s, (0, 0, 0, width - s.shape[1])) for s, _ in chunks])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m in chunks])
    return states.half(), mask.bool()


def photo_chunks(rows: list[CatalogRow], batch: int = 64) -> list[list[CatalogRow]]:
    """The items whose photos and re-shots go through the image encoder together: a
    catalogue photo and its ``AUG_VIEWS`` re-shots per item, about ``batch`` images."""
    step = max(1, batch // (1 + AUG_VIEWS))
    return [rows[i:i + step] for i in range(0, len(rows), step)]


def reshoots(chunk: list[CatalogRow], rng: random.Random) -> list[bytes]:
    """The chunk's catalogue photos, then ``AUG_VIEWS`` rounds of re-shots of them."""
    photos = [r.image.read_bytes() for r in chunk]
    return photos + [augment_photo(p, rng) for _ in range(AUG_VIEWS) for p in photos]


def chunk_regions(enc: Encoders, shots: list[bytes], items: int) -> torch.Tensor:
    """[items, 1 + AUG_VIEWS, R, Hi] fp16 from :func:`reshoots`' images of ``items`` items."""
    r = enc.image_regions(shots)
    return r.view(1 + AUG_VIEWS, items, *r.shape[1:]).transpose(0, 1).half()


def photo_features(enc: Encoders, rows: list[CatalogRow], rng: random.Random, batch: int = 64,
                   progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """[N, 1 + AUG_VIEWS, R, Hi] fp16: each catalogue photo's regions, then its re-shots'.

    The next chunk's re-shots are drawn on one worker thread while the encoder runs on this
    one (ONNX Runtime and most of PIL and numpy release the GIL); one worker, fed in order,
    draws from ``rng`` in the order a plain loop would, so the features are the same."""
    chunks, done, regions = photo_chunks(rows, batch), 0, []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reshoot") as pool:
        pending = pool.submit(reshoots, chunks[0], rng) if chunks else None
        for k, chunk in enumerate(chunks):
            shots = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(reshoots, chunks[k + 1], rng)
            regions.append(chunk_regions(enc, shots, len(chunk)))
            done += len(chunk)
            if progress:
                progress("photos", done, len(rows))
    return torch.cat(regions)


def compute_features(enc: Encoders, rows: list[CatalogRow], seed: int = 0, batch: int = 64,
                     progress: Callable[[str, int, int], None] | None = None) -> Features:
    """Run the frozen encoders over every item once (the expensive part of training)."""
    rng = random.Random(seed)
    words = catalogue_words(rows)
    views = [text_views(r, rng, words) for r in rows]
    flat_views = [v for vs in views for v in vs]

    def run_text(texts: list[str], role: str, label: str):
        # Batches of texts of similar length: a batch runs at its longest text's width, and
        # in catalogue order most batches would hold one long title; sorted, most run at half.
        _, lengths = enc.text_pre.encode(texts, role, bucket=1)
        order = np.argsort(lengths.sum(1), kind="stable")
        out = []
        for i in range(0, len(texts), batch):
            out.append(enc.text_states([texts[j] for j in order[i:i + batch]], role, bucket=8))
            if progress:
                progress(label, min(i + batch, len(texts)), len(texts))
        states, mask = _pad_states(out)
        back = torch.from_numpy(np.argsort(order))
        return states[back], mask[back]

    item_states, item_mask = run_text([r.title for r in rows], "passage", "titles")
    vs, vm = run_text(flat_views, "query", "text views")
    nbrs = title_neighbours(item_states, item_mask, k=EDIT_CANDIDATES)
    others = []  # [N][EDIT_VIEWS]
    for row, cand in zip(rows, nbrs.tolist()):
        best = edit_partners(row, [rows[j] for j in cand], rng, words, EDIT_VIEWS)
        others.append([cand[best[e % len(best)]] for e in range(EDIT_VIEWS)])
    es, em = run_text([edit_view(r, rows[j], rng, words) for r, js in zip(rows, others) for j in js],
                      "query", "edit views")
    n = len(rows)
    regions = photo_features(enc, rows, rng, batch, progress)
    return Features(
        ids=[r.id for r in rows], item_states=item_states, item_mask=item_mask,
        view_states=vs.view(n, TEXT_VIEWS, *vs.shape[1:]), view_mask=vm.view(n, TEXT_VIEWS, -1),
        edit_states=es.view(n, EDIT_VIEWS, *es.shape[1:]), edit_mask=em.view(n, EDIT_VIEWS, -1),
        edit_other=torch.tensor(others), regions=regions,
        view_words=[[sorted({w.lower() for w in words(strip_filler(v))}) for v in vs_] for vs_ in views],
        item_words=[sorted(_word_set(r, words)) for r in rows])


def features_path(catalog: Path, text_model: str, image_model: str, seed: int, cache_dir: Path) -> Path:
    """Where the features of ``catalog`` under these encoders and seed are cached."""
    h = hashlib.sha256(Path(catalog).read_bytes())
    h.update(f"{text_model}|{image_model}|{seed}|{TEXT_VIEWS}|{AUG_VIEWS}|{EDIT_CANDIDATES}|{EDIT_VIEWS}|v9".encode())
    return Path(cache_dir) / f"features-{h.hexdigest()[:16]}.pt"


def feature_cache_dir(checkpoint: Path) -> Path:
    """Where ``xmsearch train`` caches features by default: beside the checkpoint."""
    return Path(checkpoint).parent / ".feature-cache"


def cached_features(path: Path) -> Features | None:
    """The features cached at ``path``; None when there are none (a damaged file is removed)."""
    if not path.exists():
        return None
    try:
        return Features(**torch.load(str(path), weights_only=True))
    except Exception:  # a stale or damaged cache is recomputed, never trusted
        path.unlink()
        return None


def load_or_compute_features(catalog: Path, enc: Encoders, rows: list[CatalogRow], cache_dir: Path,
                             seed: int, progress=None) -> Features:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = features_path(catalog, enc.text_model, enc.image_model, seed, cache_dir)
    feats = cached_features(path)
    if feats is not None:
        return feats
    enc.use_onnx_images(cache_dir)  # ~6x PyTorch eager on CPU for the photos (checked for parity)
    feats = compute_features(enc, rows, seed, progress=progress)
    tmp = path.with_suffix(".tmp")
    torch.save(feats.__dict__, str(tmp))
    tmp.replace(path)
    return feats


# ------------------------------------------------------------------------- training


def info_nce(q: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
             positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of queries ``q`` against anchors ``z`` (row i belongs to row i).

    ``positives`` [B, B] (bool, diagonal set) marks further anchors that answer a query
    as well as its own: the target of each row (and column) is then spread evenly over
    its positives instead of pushing them away as negatives.
    """
    # fp32 even under bf16 autocast: logits are cosines times up to 100, and bf16's 8-bit
    # mantissa would blur the gaps between near-duplicates that the photo path must rank.
    with torch.autocast("cpu", enabled=False):
        logits = scale.float() * q.float() @ z.float().T
    if positives is None:
        target = torch.arange(len(q))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    p = positives.to(logits.dtype)
    rows = -(p / p.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    cols = -(p.T / p.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (rows + cols)


def shared_word_positives(view_words: list[frozenset], item_words: list[frozenset]) -> torch.Tensor:
    """[B, B]: item b answers view a when b's titles have every word of the view.

    "blue down jacket", cut from one item's title, fits every blue down jacket whose title
    says so; in-batch InfoNCE would otherwise teach the model to tell them apart by words
    the query does not have.  The view's own item always counts (its words come from it).
    """
    pos = torch.tensor([[vw <= iw for iw in item_words] for vw in view_words])
    pos.fill_diagonal_(True)
    return pos


def neighbour_positives(idx: torch.Tensor, nbrs: torch.Tensor) -> torch.Tensor:
    """[B, B]: item b answers row a when b is among a's ``nbrs`` (or b is a)."""
    pos = (nbrs[idx][:, :, None] == idx[None, None, :]).any(1)
    pos.fill_diagonal_(True)
    return pos


def trim_padding(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's text states without the padding columns none of its rows uses.

    Features are padded to the catalogue's longest text (``_pad_states``); a batch of 128
    mostly needs fewer, and every padded token costs a projection and attention rows that
    the masks then discard.  Padding is on the right (the tokenizers pad after the text).
    """
    used = mask.any(0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return states[:, :width], mask[:, :width]


def _embed_items(fusion: AttentionFusion, f: Features, reduced: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    states, mask = trim_padding(f.item_states[idx], f.item_mask[idx])
    return fusion.joint(fusion.text_tokens(states.float()), mask, fusion.reduced_image_tokens(reduced[idx, 0]))


@torch.no_grad()
def reduce_regions(fusion: AttentionFusion, regions: torch.Tensor, sample_idx: torch.Tensor,
                   chunk: int = 256) -> torch.Tensor:
    """Fit the frozen PCA on sample items' photos, then reduce every cached region once."""
    sample = regions[sample_idx[:400], 0].reshape(-1, regions.shape[-1])
    fusion.fit_image_reduction(sample)
    return torch.cat([fusion.image_reduce(regions[i:i + chunk].float()) for i in range(0, len(regions), chunk)])


@torch.no_grad()
def embed_all_items(fusion: AttentionFusion, f: Features, reduced: torch.Tensor, bs: int = 256) -> torch.Tensor:
    """[N, D] every item's embedding (title + catalogue photo), the module in eval mode."""
    fusion.eval()
    all_idx = torch.arange(len(f.ids))
    return torch.cat([_embed_items(fusion, f, reduced, all_idx[i:i + bs]) for i in range(0, len(all_idx), bs)])


@torch.no_grad()
def evaluate_views(fusion: AttentionFusion, f: Features, reduced: torch.Tensor, eval_idx: torch.Tensor,
                   z: torch.Tensor) -> dict:
    """Recall of the validation items' held-out views against the item embeddings ``z``:
    their last photo re-shot -> item (R@1), their title worded as a query -> item (R@10).
    Training never shows those two views (:func:`train_fusion`)."""
    fusion.eval()
    qi = fusion.image_only(fusion.reduced_image_tokens(reduced[eval_idx, ViewSampler.HELD_PHOTO]))
    t = ViewSampler.HELD_TEXT
    qs, qm = trim_padding(f.view_states[eval_idx, t], f.view_mask[eval_idx, t])
    qt = fusion.encode_text(qs.float(), qm)
    r1 = (qi @ z.T).argmax(1).eq(eval_idx).float().mean().item()
    top10 = (qt @ z.T).topk(10, dim=1).indices
    r10 = top10.eq(eval_idx[:, None]).any(1).float().mean().item()
    return {"val_image_r1": r1, "val_text_r10": r10}


def neighbour_batches(items: torch.Tensor, neighbours: torch.Tensor | None, group: int,
                      gen: torch.Generator) -> torch.Tensor:
    """A permutation of ``items`` laid out in groups of up to ``group`` look-alikes.

    Seeds are taken in random order; each is followed by those of its ``neighbours`` (rows
    index ``items``) not placed yet.  Cut into batches, every batch then holds several
    near-duplicates of each other (same kind, colour and pattern, told apart only by details),
    the negatives that in-batch InfoNCE over random batches almost never shows: at 128 of
    1500 items, an item meets one of its two or three look-alikes in a quarter of its batches.
    Without ``neighbours`` (or with ``group`` 1) it is a plain shuffle.
    """
    if group <= 1 or neighbours is None:
        return items[torch.randperm(len(items), generator=gen)]
    placed = torch.zeros(len(items), dtype=torch.bool)
    order: list[int] = []
    for seed in torch.randperm(len(items), generator=gen).tolist():
        if placed[seed]:
            continue
        members = [seed] + [j for j in neighbours[seed].tolist() if not placed[j]][: group - 1]
        placed[members] = True
        order.extend(members)
    return items[torch.tensor(order)]


class ViewSampler:
    """Draws each step's text view and photo per item, keeping the validation views out.

    Validation holds out views, not items: every item trains, since the index serves all of
    them and an item left out of training embeds worse (photo queries for the 5% of items the
    make demo checkpoint was not trained on found their product at rank 1 for 4 of 7, the
    others for 83 of 93).  A validation item never trains on its title worded as a query
    (text view 0) nor on its last photo re-shot; :func:`evaluate_views` measures those two.
    """

    HELD_TEXT = 0  # a validation item's held-out text view: its title worded as a query
    HELD_PHOTO = -1  # and photo: its last re-shot

    def __init__(self, n_text: int, n_views: int, val_idx: torch.Tensor, n: int, gen: torch.Generator):
        if len(val_idx) and not self.can_hold_out(n_text, n_views):
            raise ValueError(f"{n_text} text views and {n_views} photos per item leave nothing to hold out")
        self.n_text, self.n_views, self.gen = n_text, n_views, gen
        self.is_val = torch.zeros(n, dtype=torch.bool)
        self.is_val[val_idx] = True

    @staticmethod
    def can_hold_out(n_text: int, n_views: int) -> bool:
        """A second text view and a second re-shot (besides the catalogue photo) to train on."""
        return n_text >= 2 and n_views >= 3

    def text(self, items: torch.Tensor) -> torch.Tensor:
        """[k] a text view index per item: any for training items, 1.. for validation items."""
        v = torch.randint(0, self.n_text, (len(items),), generator=self.gen)
        held = torch.randint(1, self.n_text, (len(items),), generator=self.gen) if self.n_text > 1 else v
        return torch.where(self.is_val[items], held, v)

    def photo(self, items: torch.Tensor, low: int = 1) -> torch.Tensor:
        """[k] a photo index per item from ``low`` on (0 is the catalogue photo, 1.. its
        re-shots), never a validation item's last re-shot."""
        top = self.n_views - self.is_val[items].long()
        return low + (torch.rand(len(items), generator=self.gen) * (top - low)).long()


MIN_ITEMS = 8


def _check_enough_items(n: int) -> None:
    if n < MIN_ITEMS:
        raise InputError(f"training needs at least {MIN_ITEMS} items, the catalogue has {n}")


def train_fusion(f: Features, text_model: str, image_model: str, cfg: TrainConfig = TrainConfig(),
                 on_epoch: Callable[[dict], None] | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train an AttentionFusion on cached features; returns the checkpoint and history."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(f.ids)
    _check_enough_items(n)
    perm = torch.randperm(n, generator=gen)
    n_views = f.regions.shape[1]  # catalogue photo + augmented re-shots
    n_text = f.view_states.shape[1]  # query-role text views, the title first
    # Validation holds out views, not items (ViewSampler): every item trains.
    n_val = int(round(n * cfg.val_fraction)) if ViewSampler.can_hold_out(n_text, n_views) else 0
    val_idx = perm[:n_val].sort().values
    eval_idx = val_idx if n_val else perm[: min(n, 200)]
    views = ViewSampler(n_text, n_views, val_idx, n, gen)
    fusion = AttentionFusion(f.item_states.shape[-1], f.regions.shape[-1], width=cfg.width,
                             embed_dim=cfg.embed_dim, image_reduce_dim=cfg.image_reduce_dim,
                             query_cross=cfg.query_cross, item_mix=cfg.item_mix)
    reduced = reduce_regions(fusion, f.regions, perm)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))
    trainable = [p for p in fusion.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable + [log_scale], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.1)
    view_words = [[frozenset(v) for v in vs] for vs in f.view_words]
    item_words = [frozenset(w) for w in f.item_words]
    precision = resolve_precision(cfg.precision)
    # Forward passes only: the backward follows the dtypes autocast chose, the optimiser
    # updates fp32 weights.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    history, t0, step, z_all = [], time.time(), 0, None
    for epoch in range(1, cfg.epochs + 1):
        # Look-alikes by the model itself, from the item embeddings the last epoch's
        # validation computed (after one epoch of random batches its item space already
        # groups kind, colour and pattern; raw photo features group backdrops).
        neighbours = (nearest_rows(z_all, 2 * cfg.group_size)
                      if cfg.group_size > 1 and z_all is not None else None)
        edit_nbrs = (nearest_rows(z_all, cfg.edit_positives)
                     if cfg.edit_positives > 0 and z_all is not None else None)
        fusion.train()
        order = torch.randperm(n, generator=gen)
        hard = (neighbour_batches(torch.arange(n), neighbours, cfg.group_size, gen)
                if neighbours is not None else None)
        losses = []
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            if len(idx) < 2:
                continue
            k = len(idx)
            v = views.text(idx)
            e = torch.randint(0, f.edit_other.shape[1], (k,), generator=gen)
            j = f.edit_other[idx, e]
            title_s, title_m = trim_padding(f.item_states[idx], f.item_mask[idx])
            view_s, vm = trim_padding(f.view_states[idx, v], f.view_mask[idx, v])
            edit_s, edit_m = trim_padding(f.edit_states[idx, e], f.edit_mask[idx, e])
            with autocast:
                # Project every feature tensor once; the views below reuse the tokens.
                title_t = fusion.text_tokens(title_s.float())
                view_t = fusion.text_tokens(view_s.float())
                edit_t = fusion.text_tokens(edit_s.float())
                photo_v = fusion.reduced_image_tokens(reduced[idx, 0])
                aug_v = fusion.reduced_image_tokens(reduced[idx, views.photo(idx)])
                # Edit view: the words of i that j lacks over a photo of j.
                other_v = fusion.reduced_image_tokens(reduced[j, views.photo(j, low=0)])
                edit_pos = None if edit_nbrs is None else neighbour_positives(idx, edit_nbrs)
                positives = shared_word_positives([view_words[a][b] for a, b in zip(idx.tolist(), v.tolist())],
                                                  [item_words[a] for a in idx.tolist()])
                z = fusion.joint(title_t, title_m, photo_v)
                scale = log_scale.exp().clamp(max=100)
                zq = z.detach() if cfg.query_detach else z
                loss = (info_nce(fusion.text_only(view_t, vm), z, scale, positives)
                        + info_nce(fusion.image_only(aug_v), z, scale)
                        + info_nce(fusion.image_only(photo_v), z, scale)
                        + info_nce(fusion.joint(view_t, vm, aug_v, query=True), zq, scale,
                                   edit_pos if cfg.view_positives else None)
                        + info_nce(fusion.joint(edit_t, edit_m, other_v, query=True), zq, scale, edit_pos))
                if hard is not None and len(hard[b:b + cfg.batch_size]) > 1:
                    # Photo -> item again, on a batch of look-alike groups: only the photo path
                    # has to tell them apart (text and edit queries name no detail that could).
                    h = hard[b:b + cfg.batch_size]
                    zh = _embed_items(fusion, f, reduced, h)
                    shots = reduced[h, views.photo(h)]
                    loss = loss + info_nce(fusion.image_only(fusion.reduced_image_tokens(shots)), zh, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if on_step:
                on_step(step, loss.item())
        z_all = embed_all_items(fusion, f, reduced)
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                  **evaluate_views(fusion, f, reduced, eval_idx, z_all), "seconds": round(time.time() - t0, 2)}
        history.append(record)
        if on_epoch:
            on_epoch(record)
    fusion.eval()
    meta = {"epochs": cfg.epochs, "items": n, "val_items": n_val, "recipe": TRAINING_RECIPE, "history": history,
            "config": cfg.__dict__, "precision": precision}
    return TrainResult(FusionCheckpoint(fusion, text_model, image_model, trained=True, meta=meta),
                       history, time.time() - t0)


def train_catalog(catalog: Path, out: Path, text_model: str, image_model: str,
                  cfg: TrainConfig = TrainConfig(), cache_dir: Path | None = None,
                  progress=None, on_epoch=None, on_step=None, image_checkpoint=None) -> TrainResult:
    """Read a catalogue, cache frozen features, train, and save the checkpoint to ``out``."""
    rows, bad = read_catalog(Path(catalog))
    if not rows:
        raise InputError(f"catalogue {catalog} has no usable rows ({len(bad)} bad)")
    _check_enough_items(len(rows))  # before the expensive encoding, which also needs neighbours
    enc = Encoders.load(text_model, image_model, image_checkpoint)
    cache_dir = cache_dir or feature_cache_dir(out)
    feats = load_or_compute_features(Path(catalog), enc, rows, cache_dir, cfg.seed, progress)
    result = train_fusion(feats, text_model, image_model, cfg, on_epoch, on_step)
    result.features = feats
    result.checkpoint.meta.update({"catalog": str(catalog), "bad_rows": len(bad),
                                   "features": features_path(Path(catalog), text_model, image_model,
                                                             cfg.seed, cache_dir).name})
    result.checkpoint.save(Path(out))
    return result


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def stale_checkpoint(ckpt: Path, catalog: Path, text_model: str, image_model: str,
                     cfg: TrainConfig) -> str | None:
    """Why the checkpoint at ``ckpt`` is not what ``train_catalog(catalog, ckpt, ...)`` would
    train now (None when it is): missing or unreadable, other encoders, another catalogue or
    feature recipe (the feature cache key), or other training settings."""
    try:
        ck = FusionCheckpoint.load(ckpt)
    except CheckpointError as e:
        return str(e)
    if (ck.text_model, ck.image_model) != (text_model, image_model):
        return f"it was trained on {ck.text_model} + {ck.image_model}, not {text_model} + {image_model}"
    if ck.meta.get("recipe", 1) != TRAINING_RECIPE:
        return f"it was trained by training recipe {ck.meta.get('recipe', 1)}, this version's is {TRAINING_RECIPE}"
    if "features" not in ck.meta:
        return "it does not record the catalogue and features it was trained on"
    if ck.meta["features"] != features_path(catalog, text_model, image_model, cfg.seed, feature_cache_dir(ckpt)).name:
        return "it was trained on another catalogue or feature recipe"
    # A setting added after the checkpoint was trained counts as its default: a new setting's
    # default trains as before it existed (one that does not comes with a new TRAINING_RECIPE).
    old = {**_DEFAULTS, **ck.meta.get("config", {})}
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in asdict(cfg).items() if old[k] != v]
    if changed:
        return "its training settings differ: " + ", ".join(changed)
    return None
