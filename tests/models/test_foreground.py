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
