from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightly_cotap.models.foreground import foreground_mask_from_attention


def _gaussian_blur_reference(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Independent 2D Gaussian blur with reflect padding. (B, H, W) -> (B, H, W)."""
    r = kernel_size // 2
    coords = torch.arange(kernel_size, dtype=torch.float64) - r
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]
    padded = F.pad(x[:, None].double(), (r, r, r, r), mode="reflect")
    return F.conv2d(padded, kernel)[:, 0]


def _check_mask_properties(att: Tensor, mask: Tensor, keep_mass: float) -> None:
    """Kept patches have the highest attention and hold ~keep_mass of the mass."""
    for a, m in zip(att.flatten(1), mask.flatten(1)):
        kept, dropped = a[m], a[~m]
        assert kept.numel() > 0
        if dropped.numel() > 0:
            assert kept.min() >= dropped.max()
        frac = kept.sum() / a.sum()
        # The smallest prefix (by attention) reaching keep_mass.
        assert frac >= keep_mass - 1e-6
        assert frac - kept.min() / a.sum() < keep_mass + 1e-6


class TestForegroundMask:
    @pytest.mark.parametrize("keep_mass", [0.6, 0.3, 0.9])
    def test_keeps_top_patches_and_mass_without_blur(self, keep_mass: float) -> None:
        torch.manual_seed(0)
        att = torch.rand(8, 6 * 7) ** 3
        mask = foreground_mask_from_attention(
            att, grid_size=(6, 7), keep_mass=keep_mass, blur_kernel_size=1
        )
        assert mask.shape == (8, 6, 7) and mask.dtype == torch.bool
        _check_mask_properties(att, mask, keep_mass)

    def test_default_blur_and_60_percent(self) -> None:
        torch.manual_seed(1)
        att = torch.rand(4, 14, 14).softmax(dim=0) ** 2
        mask = foreground_mask_from_attention(att)
        blurred = _gaussian_blur_reference(att, kernel_size=7, sigma=0.6)
        _check_mask_properties(blurred, mask, 0.6)
        # Roughly 60% of the raw mass as well, and not everything.
        raw_frac = (att * mask).sum(dim=(1, 2)) / att.sum(dim=(1, 2))
        assert ((raw_frac > 0.45) & (raw_frac < 0.8)).all()
        assert (mask.flatten(1).float().mean(1) < 1.0).all()

    def test_flat_and_grid_input_agree(self) -> None:
        att = torch.rand(3, 5, 4)
        a = foreground_mask_from_attention(att)
        b = foreground_mask_from_attention(att.flatten(1), grid_size=(5, 4))
        assert torch.equal(a, b)

    def test_peaked_attention_keeps_peak_region(self) -> None:
        att = torch.full((1, 8, 8), 1e-4)
        att[0, 2:4, 5:7] = 1.0
        mask = foreground_mask_from_attention(att, blur_kernel_size=1)
        expected = torch.zeros(1, 8, 8, dtype=torch.bool)
        expected[0, 2:4, 5:7] = True
        # 3 of the 4 peak cells hold 75% >= 60% of the mass.
        assert mask.sum() == 3 and (mask <= expected).all()

    def test_uniform_and_zero_attention(self) -> None:
        mask = foreground_mask_from_attention(torch.ones(2, 10), (2, 5))
        assert int(mask[0].sum()) == math.ceil(0.6 * 10)
        mask = foreground_mask_from_attention(torch.zeros(2, 3, 3))
        assert mask.all()  # no information: nothing is dropped, no NaN

    def test_small_grids(self) -> None:
        for h, w in [(1, 1), (2, 3), (1, 5)]:
            mask = foreground_mask_from_attention(torch.rand(2, h, w))
            assert mask.shape == (2, h, w) and mask.any()

    def test_half_precision_input(self) -> None:
        att = torch.rand(2, 36)
        a = foreground_mask_from_attention(att.half(), (6, 6), blur_kernel_size=1)
        b = foreground_mask_from_attention(
            att.half().float(), (6, 6), blur_kernel_size=1
        )
        assert torch.equal(a, b)

    def test_invalid(self) -> None:
        with pytest.raises(ValueError, match="grid_size"):
            foreground_mask_from_attention(torch.rand(2, 10))
        with pytest.raises(ValueError, match="grid_size"):
            foreground_mask_from_attention(torch.rand(2, 10), grid_size=(3, 3))
        with pytest.raises(ValueError, match="grid_size"):
            foreground_mask_from_attention(torch.rand(2, 3, 3), grid_size=(9, 1))
        with pytest.raises(ValueError, match="shape"):
            foreground_mask_from_attention(torch.rand(2, 3, 3, 3))
        with pytest.raises(ValueError, match="keep_mass"):
            foreground_mask_from_attention(torch.rand(2, 3, 3), keep_mass=0.0)
        with pytest.raises(ValueError, match="blur_kernel_size"):
            foreground_mask_from_attention(torch.rand(2, 3, 3), blur_kernel_size=4)
        with pytest.raises(ValueError, match="blur_sigma"):
            foreground_mask_from_attention(torch.rand(2, 3, 3), blur_sigma=0.0)


def _top_mass_mask_reference(att: Tensor, keep_mass: float) -> Tensor:
    """Smallest set of highest-attention cells holding ``keep_mass`` of the mass (up
    to 1e-6), image by image. (B, H, W) -> (B, H, W) bool.
    """
    masks = []
    for a in att.double().flatten(1):
        total = float(a.sum())
        kept = torch.zeros_like(a, dtype=torch.bool)
        held = 0.0
        for index in torch.argsort(a, descending=True).tolist():
            if total > 0 and held >= keep_mass - 1e-6:
                break
            kept[index] = True
            held += float(a[index]) / total
        masks.append(kept)
    return torch.stack(masks).reshape(att.shape)


class TestForegroundMaskAgainstReference:
    @pytest.mark.parametrize("batch_size", [1, 3])
    def test_default_blur_and_mass_match_reference(self, batch_size: int) -> None:
        # float64 attention: torchvision blurs in float64 and the reference agrees to
        # rounding, so the masks must be equal.
        torch.manual_seed(10 + batch_size)
        att = torch.rand(batch_size, 9, 11, dtype=torch.float64) ** 4
        mask = foreground_mask_from_attention(att)
        expected = _top_mass_mask_reference(
            _gaussian_blur_reference(att, kernel_size=7, sigma=0.6), 0.6
        )
        assert torch.equal(mask, expected)
        grid = foreground_mask_from_attention(att, grid_size=(9, 11))
        assert torch.equal(grid, expected)

    @pytest.mark.parametrize("keep_mass", [0.2, 0.5, 1.0])
    def test_keep_mass_and_sigma_match_reference(self, keep_mass: float) -> None:
        torch.manual_seed(12)
        att = torch.rand(2, 8 * 6, dtype=torch.float64) ** 3
        mask = foreground_mask_from_attention(
            att, (8, 6), keep_mass=keep_mass, blur_kernel_size=5, blur_sigma=1.3
        )
        blurred = _gaussian_blur_reference(att.reshape(2, 8, 6), 5, 1.3)
        assert torch.equal(mask, _top_mass_mask_reference(blurred, keep_mass))

    def test_rounding_tolerance_of_the_mass(self) -> None:
        # Four equal cells hold 0.25 each. Two hold 0.5, which reaches keep_mass
        # 0.5 + 1e-6 within the tolerance but not 0.5 + 2e-6.
        att = torch.ones(1, 2, 2)
        sizes = {
            keep_mass: int(
                foreground_mask_from_attention(
                    att, keep_mass=keep_mass, blur_kernel_size=1
                ).sum()
            )
            for keep_mass in (0.5 - 1e-7, 0.5, 0.5 + 1e-6, 0.5 + 2e-6)
        }
        assert sizes == {0.5 - 1e-7: 2, 0.5: 2, 0.5 + 1e-6: 2, 0.5 + 2e-6: 3}

    def test_scale_invariance_down_to_tiny_attention(self) -> None:
        torch.manual_seed(13)
        att = torch.rand(2, 5, 5, dtype=torch.float64)
        mask = foreground_mask_from_attention(att)
        for scale in (1e3, 1e-30, 1e-300):
            assert torch.equal(foreground_mask_from_attention(att * scale), mask)

    def test_low_precision_attention_is_blurred_in_float32(self) -> None:
        torch.manual_seed(14)
        att = (torch.rand(4, 12, 12) ** 3).bfloat16()
        mask = foreground_mask_from_attention(att)
        assert torch.equal(mask, foreground_mask_from_attention(att.float()))

    def test_grid_size_matching_the_map_is_accepted(self) -> None:
        att = torch.rand(2, 3, 4)
        assert torch.equal(
            foreground_mask_from_attention(att, grid_size=(3, 4)),
            foreground_mask_from_attention(att),
        )

    def test_empty_batch(self) -> None:
        mask = foreground_mask_from_attention(torch.zeros(0, 4, 5))
        assert mask.shape == (0, 4, 5) and mask.dtype == torch.bool

    @pytest.mark.parametrize("keep_mass", [1.5, -0.1])
    def test_keep_mass_out_of_range(self, keep_mass: float) -> None:
        with pytest.raises(ValueError, match="keep_mass"):
            foreground_mask_from_attention(torch.rand(2, 3, 3), keep_mass=keep_mass)
