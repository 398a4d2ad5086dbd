"""Fusion module: shapes, normalisation, masking, and the three entry points."""

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


@pytest.mark.parametrize("kind", ["text", "image", "joint"])
def test_entry_points_give_unit_vectors(fusion, kind):
    states, mask, regions = _inputs()
    args = {"text": (states, mask), "image": (regions,), "joint": (states, mask, regions)}[kind]
    with torch.no_grad():
        out = FusionEntry(fusion, kind)(*args)
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


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
    with pytest.raises(ValueError, match="text, image or joint"):
        FusionEntry(fusion, "audio")


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
