"""Fusion module: shapes, normalisation, masking, and the entry points."""

import pytest
import torch

from xmsearch.models.fusion import AttentionFusion, FusionEntry


@pytest.fixture(scope="module")
def fusion():
    torch.manual_seed(0)
    return AttentionFusion(text_dim=32, image_dim=48, width=64, heads=4, embed_dim=16).eval()


def _inputs(b=3, s=8, r=5):
    g = torch.Generator().manual_seed(1)
    states = torch.randn(b, s, 32, generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 3:] = 0
    return states, mask, torch.randn(b, r, 48, generator=g)


@pytest.mark.parametrize("kind", ["text", "image", "joint", "item"])
def test_entry_points_give_unit_vectors(fusion, kind):
    states, mask, regions = _inputs()
    args = {"text": (states, mask), "image": (regions,), "joint": (states, mask, regions),
            "item": (states, mask, regions)}[kind]
    with torch.no_grad():
        out = FusionEntry(fusion, kind)(*args)
    # The item entry point returns the item vector and its photo-side vector.
    for vec in out if kind == "item" else (out,):
        assert vec.shape == (3, 16)
        assert torch.allclose(vec.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_padding_tokens_are_ignored(fusion):
    states, mask, regions = _inputs()
    noisy = states.clone()
    noisy[0, 3:] = 1000.0  # garbage behind the mask of row 0
    with torch.no_grad():
        assert torch.allclose(fusion.encode_text(states, mask), fusion.encode_text(noisy, mask), atol=1e-5)
        assert torch.allclose(fusion.encode_joint(states, mask, regions),
                              fusion.encode_joint(noisy, mask, regions), atol=1e-5)


def test_rows_are_independent_of_their_batch(fusion):
    states, mask, regions = _inputs()
    with torch.no_grad():
        full = fusion.encode_joint(states, mask, regions)
        one = fusion.encode_joint(states[1:2], mask[1:2], regions[1:2])
    assert torch.allclose(full[1:2], one, atol=1e-5)


def test_joint_depends_on_both_modalities(fusion):
    states, mask, regions = _inputs()
    with torch.no_grad():
        base = fusion.encode_joint(states, mask, regions)
        other_img = fusion.encode_joint(states, mask, regions.flip(0))
        other_txt = fusion.encode_joint(states.flip(0), mask.flip(0), regions)
    assert not torch.allclose(base, other_img, atol=1e-3)
    assert not torch.allclose(base, other_txt, atol=1e-3)


def test_unknown_entry_point_is_refused(fusion):
    with pytest.raises(ValueError, match="text, image, joint or item"):
        FusionEntry(fusion, "audio")


def test_query_cross_gives_text_image_queries_their_own_cross_attention():
    states, mask, regions = _inputs()
    torch.manual_seed(0)
    shared = AttentionFusion(text_dim=32, image_dim=48, width=64, heads=4, embed_dim=16).eval()
    torch.manual_seed(0)
    own = AttentionFusion(text_dim=32, image_dim=48, width=64, heads=4, embed_dim=16, query_cross=True).eval()
    assert own.config()["query_cross"] and not shared.config()["query_cross"]
    # The query-side modules are extra parameters; everything the items use is the same.
    extra = set(own.state_dict()) - set(shared.state_dict())
    assert extra and all(k.split(".")[0] in ("t2i_q", "i2t_q", "norm_t_q", "norm_i_q") for k in extra)
    own.load_state_dict({**own.state_dict(), **shared.state_dict()})
    with torch.no_grad():
        item = FusionEntry(own, "item")(states, mask, regions)[0]
        query = FusionEntry(own, "joint")(states, mask, regions)
        assert torch.equal(item, FusionEntry(shared, "item")(states, mask, regions)[0])
        assert not torch.allclose(item, query, atol=1e-3)  # the query weights are its own
        # Without query_cross both entry points are one computation.
        assert torch.equal(FusionEntry(shared, "joint")(states, mask, regions), item)


def test_frozen_image_reduction_is_pca_and_consistent():
    torch.manual_seed(0)
    f = AttentionFusion(text_dim=32, image_dim=48, width=64, heads=4, embed_dim=16, image_reduce_dim=8).eval()
    regions = torch.randn(200, 48) @ torch.randn(48, 48)
    f.fit_image_reduction(regions)
    w = f.image_reduce.weight
    assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-4)  # orthonormal principal axes
    assert not f.image_reduce.weight.requires_grad
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        direct = f.encode_image(x)
        via_reduced = f.image_only(f.reduced_image_tokens(f.image_reduce(x)))
    assert torch.allclose(direct, via_reduced, atol=1e-6)
    assert f.config()["image_reduce_dim"] == 8


def test_item_mix_adds_the_single_modality_embeddings_to_the_stored_item_vector():
    states, mask, regions = _inputs()
    torch.manual_seed(0)
    plain = AttentionFusion(text_dim=32, image_dim=48, width=64, heads=4, embed_dim=16, query_cross=True).eval()
    mixed = AttentionFusion(**{**plain.config(), "item_mix": 0.5}).eval()
    mixed.load_state_dict(plain.state_dict())  # a setting, not weights: old checkpoints load as they were
    assert plain.config()["item_mix"] == 0.0 and mixed.config()["item_mix"] == 0.5
    with torch.no_grad():
        joint = plain.encode_joint(states, mask, regions)
        assert torch.equal(FusionEntry(plain, "item")(states, mask, regions)[0], joint)
        want = torch.nn.functional.normalize(
            joint + 0.5 * (plain.encode_text(states, mask) + plain.encode_image(regions)), dim=-1)
        got, photo = FusionEntry(mixed, "item")(states, mask, regions)
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.equal(got, mixed.encode_item(states, mask, regions))
        # The photo-side vector has none of the title-only embedding, whatever the mix.
        want_photo = torch.nn.functional.normalize(joint + plain.encode_image(regions), dim=-1)
        assert torch.allclose(photo, want_photo, atol=1e-6)
        assert torch.equal(photo, FusionEntry(plain, "item")(states, mask, regions)[1])
        assert not torch.allclose(got, joint, atol=1e-3)
        # Only the stored item vectors change: every query entry point is the same computation.
        assert torch.equal(FusionEntry(mixed, "joint")(states, mask, regions),
                           FusionEntry(plain, "joint")(states, mask, regions))
        assert torch.equal(mixed.encode_text(states, mask), plain.encode_text(states, mask))
    with pytest.raises(ValueError, match="item_mix"):
        AttentionFusion(text_dim=32, image_dim=48, item_mix=-1.0)


def test_pooling_folds_the_key_and_value_projections_into_its_query():
    """PoolAttention.pooled computes what Attention.forward does for one shared query,
    masked tokens, dropout included (the same random draws), with the same weights."""
    from xmsearch.models.fusion import PoolAttention

    torch.manual_seed(0)
    pool = PoolAttention(width=64, heads=4, dropout=0.2)
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_(0.0, 0.2)  # biases too: the fold carries the key and value biases
    query = torch.randn(64)
    tokens = torch.randn(5, 7, 64)
    valid = torch.rand(5, 7) > 0.4
    valid[:, 0] = True
    for mode in ("eval", "train"):
        getattr(pool, mode)()
        torch.manual_seed(1)
        full = pool(query.expand(5, 1, 64), tokens, valid)[:, 0]
        torch.manual_seed(1)
        folded = pool.pooled(query, tokens, valid)
        assert torch.allclose(full, folded, atol=1e-5), mode
    # Masked tokens do not count, whatever they hold.
    pool.eval()
    noisy = tokens.masked_fill(~valid[..., None], 1e3)
    assert torch.allclose(pool.pooled(query, tokens, valid), pool.pooled(query, noisy, valid), atol=1e-5)
