"""Attention fusion: text token states and image regions -> one L2-normalised embedding.

Structure (all trained, encoders frozen):

1. project text tokens (``text_dim``) and image regions (``image_dim``) to ``width``, add a
   learned modality embedding;
2. cross-attention both ways when both modalities are present: text tokens attend to
   image regions (which part of the photo does "red collar" mean) and regions attend to
   text tokens;
3. attention pooling: a learned query attends over all (unmasked) tokens of the present
   modalities, added to their masked mean (a stable start for training);
4. a projection to ``embed_dim`` and L2 normalisation.

Text-only, image-only and text+image are three entry points over the same weights;
each is exported as its own graph (``fusion_text``, ``fusion_image``, ``fusion_joint``) so
a query never pays for, nor needs placeholders for, a modality it does not have.

With ``query_cross``, text+image *queries* ("like this photo, but red") get their own
cross-attention (step 2), while catalogue items (title + photo) keep the shared one:
an item's photo and title agree, a query's words override part of its photo, and one
set of weights trained for both underfits the second (benchmarks/results/quality_ab.md).
Items are then exported as a fourth graph, ``fusion_item``; without ``query_cross`` it
computes the same as ``fusion_joint``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention written with shape-agnostic reshapes.

    ``nn.MultiheadAttention`` traces the batch size into constants of the exported graph
    (the parity check with another batch size fails); this version keeps every axis
    symbolic, and treats ``valid`` (True = attend) as the key mask.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h, d = self.heads, self.head_dim
        q = self.q(x).unflatten(-1, (h, d)).transpose(1, 2)  # [B, h, Lq, d]
        k, v = self.kv(ctx).unflatten(-1, (2, h, d)).permute(2, 0, 3, 1, 4)  # 2 x [B, h, Lk, d]
        scores = q @ k.transpose(-1, -2) * (d ** -0.5)
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, None, :], -1e4)
        attn = self.dropout(scores.softmax(-1))
        return self.out((attn @ v).transpose(1, 2).flatten(2))


class PoolAttention(Attention):
    """Attention of one learned query over a set of tokens, with :class:`Attention`'s
    weights (checkpoints load either way) but the key and value projections folded.

    With a single query the per-token projections are not needed.  The score of token x
    in head h is q_h . (Wk_h x + bk_h) = x . (Wk_h^T q_h) + q_h . bk_h, and since a head's
    attention weights a_j are applied to values linear in x, its output is
    Wv_h (sum_j a_j x_j) + bv_h sum_j a_j (the weights sum to 1 but for dropout, which is
    why the sum stays).  Projecting every token to a key and a value costs 2 * width^2
    multiply-adds per token; folded, a token costs 2 * heads * width (its scores and its
    share of each head's weighted sum), and a row one width^2 value projection.  Measured
    in ``benchmarks/pool_fold.py``.
    """

    def pooled(self, query: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None = None
               ) -> torch.Tensor:
        """[B, width]: ``query`` ([width], shared by every row) attending over ``tokens``
        [B, L, width] (``valid`` [B, L], True = attend)."""
        h, d = self.heads, self.head_dim
        width = tokens.shape[-1]
        q = self.q(query).view(h, d)
        wk, wv = self.kv.weight.view(2, h, d, width).unbind(0)  # [h, d, width] each
        bk, bv = self.kv.bias.view(2, h, d).unbind(0)
        u = (q.unsqueeze(1) @ wk).squeeze(1)  # [h, width]: the query folded into the keys
        c = (q * bk).sum(-1)  # [h]
        scores = ((tokens @ u.transpose(0, 1)) + c).transpose(1, 2) * (d ** -0.5)  # [B, h, L]
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], -1e4)
        attn = self.dropout(scores.softmax(-1))
        ctx = attn @ tokens  # [B, h, width]: each head's weighted mean of the tokens
        v = (ctx.transpose(0, 1) @ wv.transpose(1, 2)).transpose(0, 1)  # [B, h, d]
        v = v + bv * attn.sum(-1, keepdim=True)
        return self.out(v.flatten(1))


ITEM_MIX_MAX = 10.0  # AttentionFusion.item_mix lies in [0, ITEM_MIX_MAX]


class AttentionFusion(nn.Module):
    def __init__(self, text_dim: int, image_dim: int, width: int = 256, heads: int = 4,
                 embed_dim: int = 256, dropout: float = 0.1, image_reduce_dim: int | None = None,
                 query_cross: bool = False, item_mix: float = 0.0):
        super().__init__()
        if not 0.0 <= item_mix <= ITEM_MIX_MAX:
            raise ValueError(f"item_mix must be in [0, {ITEM_MIX_MAX:g}], got {item_mix}")
        self.text_dim, self.image_dim, self.width, self.embed_dim = text_dim, image_dim, width, embed_dim
        self.image_reduce_dim = image_reduce_dim
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        # Optional frozen linear reduction of the region features (PCA of the catalogue's
        # regions, set by training): training then works on cached reduced features,
        # 5x cheaper than projecting 1280-wide regions in every step.
        self.image_reduce = None
        proj_in = image_dim
        if image_reduce_dim:
            self.image_reduce = nn.Linear(image_dim, image_reduce_dim)
            self.image_reduce.requires_grad_(False)
            proj_in = image_reduce_dim
        self.image_proj = nn.Sequential(nn.LayerNorm(proj_in), nn.Linear(proj_in, width))
        self.modality = nn.Parameter(torch.zeros(2, width))
        self.heads = heads
        self.t2i = Attention(width, heads, dropout)
        self.i2t = Attention(width, heads, dropout)
        self.norm_t = nn.LayerNorm(width)
        self.norm_i = nn.LayerNorm(width)
        self.query_cross = query_cross
        self.item_mix = float(item_mix)
        if query_cross:
            self.t2i_q = Attention(width, heads, dropout)
            self.i2t_q = Attention(width, heads, dropout)
            self.norm_t_q = nn.LayerNorm(width)
            self.norm_i_q = nn.LayerNorm(width)
        self.pool_query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pool = PoolAttention(width, heads, dropout)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(width, embed_dim))

    def config(self) -> dict:
        return {"text_dim": self.text_dim, "image_dim": self.image_dim, "width": self.width,
                "heads": self.heads, "embed_dim": self.embed_dim,
                "image_reduce_dim": self.image_reduce_dim, "query_cross": self.query_cross,
                "item_mix": self.item_mix}

    # The three entry points -------------------------------------------------------

    def encode_text(self, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.text_only(self.text_tokens(text_states), text_mask)

    def encode_image(self, image_regions: torch.Tensor) -> torch.Tensor:
        return self.image_only(self.image_tokens(image_regions))

    def encode_joint(self, text_states: torch.Tensor, text_mask: torch.Tensor,
                     image_regions: torch.Tensor, query: bool = False) -> torch.Tensor:
        """Title + photo of an item, or with ``query`` a text+image query (see ``query_cross``)."""
        return self.joint(self.text_tokens(text_states), text_mask, self.image_tokens(image_regions), query)

    def encode_item(self, text_states: torch.Tensor, text_mask: torch.Tensor,
                    image_regions: torch.Tensor) -> torch.Tensor:
        """A catalogue item (title + photo): the vector the index searches."""
        return self.item(self.text_tokens(text_states), text_mask, self.image_tokens(image_regions))

    def encode_item_vectors(self, text_states: torch.Tensor, text_mask: torch.Tensor,
                            image_regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A catalogue item's two stored vectors (:meth:`item_vectors`)."""
        return self.item_vectors(self.text_tokens(text_states), text_mask, self.image_tokens(image_regions))

    # The same on projected tokens: training projects each feature tensor once and
    # reuses it across views (the 1280-wide region projection dominates its cost).

    def text_tokens(self, states: torch.Tensor) -> torch.Tensor:
        return self.text_proj(states) + self.modality[0]

    def image_tokens(self, regions: torch.Tensor) -> torch.Tensor:
        if self.image_reduce is not None:
            regions = self.image_reduce(regions)
        return self.reduced_image_tokens(regions)

    def reduced_image_tokens(self, reduced: torch.Tensor) -> torch.Tensor:
        """Tokens from regions already passed through ``image_reduce`` (training)."""
        return self.image_proj(reduced) + self.modality[1]

    @torch.no_grad()
    def fit_image_reduction(self, regions: torch.Tensor) -> None:
        """Set ``image_reduce`` to the PCA of sample regions [n, image_dim] (frozen)."""
        if self.image_reduce is None:
            raise ValueError("this fusion module was built without image_reduce_dim")
        x = regions.float()
        mean = x.mean(0)
        # Right singular vectors of the centred sample = principal axes.
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        comps = vh[: self.image_reduce_dim]
        self.image_reduce.weight.copy_(comps)
        self.image_reduce.bias.copy_(-comps @ mean)

    def text_only(self, t: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self._pool_and_project(t, text_mask.bool())

    def image_only(self, v: torch.Tensor) -> torch.Tensor:
        valid = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)
        return self._pool_and_project(v, valid)

    def joint(self, t: torch.Tensor, text_mask: torch.Tensor, v: torch.Tensor, query: bool = False) -> torch.Tensor:
        tmask = text_mask.bool()
        if query and self.query_cross:
            t2i, i2t, norm_t, norm_i = self.t2i_q, self.i2t_q, self.norm_t_q, self.norm_i_q
        else:
            t2i, i2t, norm_t, norm_i = self.t2i, self.i2t, self.norm_t, self.norm_i
        t2 = norm_t(t + t2i(t, v))
        v2 = norm_i(v + i2t(v, t, tmask))
        tokens = torch.cat([t2, v2], dim=1)
        valid = torch.cat([tmask, torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)], dim=1)
        return self._pool_and_project(tokens, valid)

    def item(self, t: torch.Tensor, text_mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """An item's stored vector: its joint title + photo embedding plus ``item_mix`` times
        the sum of its title-only and photo-only embeddings, renormalised.

        Training matches every query view against the joint embedding alone; the two
        single-modality embeddings of the same item are added afterwards, a late fusion
        of three views of one product (``TrainConfig.item_mix``)."""
        return self.item_vectors(t, text_mask, v)[0]

    def item_vectors(self, t: torch.Tensor, text_mask: torch.Tensor, v: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """An item's two stored vectors: :meth:`item` (what every query kind searches) and
        its photo-side vector, ``normalise(joint + photo-only)``, by which the candidates
        of a photo query are ranked again.

        The two query kinds pull the stored vector apart: text and text+image queries find
        their items best with much of the title-only embedding in it, photo queries with
        none of it and more of the photo-only one (a grid of both weights on a development
        query set, benchmarks/results/quality_ab.md, 2026-12-06 afternoon)."""
        z = self.joint(t, text_mask, v)
        p = self.image_only(v)
        photo = F.normalize(z + p, dim=-1)
        if self.item_mix:
            z = F.normalize(z + self.item_mix * (self.text_only(t, text_mask) + p), dim=-1)
        return z, photo

    def _pool_and_project(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        pooled = self.pool.pooled(self.pool_query[0, 0], tokens, valid)
        w = valid.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * w).sum(1) / w.sum(1).clamp(min=1.0)
        return F.normalize(self.head(pooled + mean), dim=-1)


class FusionEntry(nn.Module):
    """One entry point of the fusion module as a plain forward() for ONNX export."""

    def __init__(self, fusion: AttentionFusion, kind: str):
        super().__init__()
        if kind not in ("text", "image", "joint", "item"):
            raise ValueError(f"kind must be text, image, joint or item, got {kind!r}")
        self.fusion, self.kind = fusion, kind

    def forward(self, *args):
        f = self.fusion
        if self.kind == "text":
            return f.encode_text(args[0], args[1])
        if self.kind == "image":
            return f.encode_image(args[0])
        if self.kind == "item":
            return f.encode_item_vectors(args[0], args[1], args[2])
        return f.encode_joint(args[0], args[1], args[2], query=True)
