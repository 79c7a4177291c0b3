from __future__ import annotations

import pytest
import torch

from lightly_cotap.eval.pca import principal_components


def _svd_reference(x: torch.Tensor, count: int) -> torch.Tensor:
    """Principal directions from the SVD of the centred data, largest loading > 0."""
    centred = x.double() - x.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:count]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    reference: torch.Tensor = comps * signs
    return reference


@pytest.mark.parametrize("shape", [(200, 12), (40, 3), (300, 2)])
def test_matches_svd_of_centred_data(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    m, c = shape
    x = torch.randn(m, c, generator=g) @ torch.randn(c, c, generator=g) + 5.0
    comps = principal_components(x, 3)
    count = min(3, c)
    assert comps.shape == (count, c) and comps.dtype == torch.float64
    torch.testing.assert_close(comps, _svd_reference(x, count), atol=1e-9, rtol=0)


def test_sign_is_deterministic() -> None:
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(principal_components(-x, 2), principal_components(x, 2))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="shape"):
        principal_components(torch.randn(4), 1)
    with pytest.raises(ValueError, match="num_components"):
        principal_components(torch.randn(4, 3), 0)
