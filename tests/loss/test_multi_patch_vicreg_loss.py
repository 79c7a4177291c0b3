from __future__ import annotations

import pytest
import torch
from lightly.loss import VICRegLoss
from torch import Tensor

from lightly_cotap.loss.multi_patch_vicreg_loss import MultiPatchVICRegLoss


def _variance(z: Tensor, eps: float) -> Tensor:
    """(1/D) sum_k relu(1 - sqrt(Var(z[:, k]) + eps)), unbiased variance."""
    b, d = z.shape
    total = torch.zeros((), dtype=z.dtype)
    for k in range(d):
        col = z[:, k]
        var = ((col - col.mean()) ** 2).sum() / (b - 1)
        total = total + torch.relu(1 - torch.sqrt(var + eps))
    return total / d


def _covariance(z: Tensor) -> Tensor:
    """(1/D) sum_(k != l) Cov(z)_kl^2."""
    b, d = z.shape
    zc = z - z.mean(dim=0)
    total = torch.zeros((), dtype=z.dtype)
    for k in range(d):
        for m in range(d):
            if k != m:
                total = total + ((zc[:, k] * zc[:, m]).sum() / (b - 1)) ** 2
    return total / d


def _reference(
    z: Tensor, lam: float, mu: float, nu: float, pooled: bool, eps: float = 1e-4
) -> Tensor:
    b, n, d = z.shape
    inv = torch.zeros((), dtype=z.dtype)
    for j in range(n):
        for k in range(n):
            if j != k:
                inv = inv + ((z[:, j] - z[:, k]) ** 2).sum() / (b * d)
    inv = inv / (n * (n - 1))
    if pooled:
        flat = z.reshape(b * n, d)
        var = _variance(flat, eps)
        cov = 2 * _covariance(flat)
    else:
        var = torch.stack([_variance(z[:, j], eps) for j in range(n)]).mean()
        cov = 2 / n * torch.stack([_covariance(z[:, j]) for j in range(n)]).sum()
    return lam * inv + mu * var + nu * cov


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("var_cov", ["per_patch", "pooled"])
def test_matches_reference(n: int, var_cov: str) -> None:
    torch.manual_seed(n)
    # Small scale so that the variance hinge is active for some dimensions.
    z = (torch.randn(6, n, 4, dtype=torch.float64) * 0.8).requires_grad_()
    criterion = MultiPatchVICRegLoss(
        lambda_param=3.0, mu_param=2.0, nu_param=0.5, var_cov=var_cov
    )
    loss = criterion(projections=z)
    expected = _reference(z, 3.0, 2.0, 0.5, pooled=var_cov == "pooled")
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, z)
    (ref_grad,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(grad, ref_grad)


def test_n2_equals_lightly_vicreg_exactly() -> None:
    torch.manual_seed(0)
    z_a = torch.randn(8, 16, requires_grad=True)
    z_b = torch.randn(8, 16, requires_grad=True)
    loss = MultiPatchVICRegLoss()(projections=torch.stack([z_a, z_b], dim=1))
    expected = VICRegLoss()(z_a, z_b)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(loss, [z_a, z_b])
    ref_grads = torch.autograd.grad(expected, [z_a, z_b])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-7)


def test_identical_patches_have_zero_invariance_and_finite_gradients() -> None:
    z = torch.ones(4, 3, 5, requires_grad=True)  # ties everywhere, zero variance
    loss = MultiPatchVICRegLoss(mu_param=0.0, nu_param=0.0)(projections=z)
    assert loss.item() == 0.0
    loss = MultiPatchVICRegLoss()(projections=z)
    loss.backward()
    assert torch.isfinite(loss)
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # Only the variance hinge is active: mu * relu(1 - sqrt(eps)).
    assert loss.item() == pytest.approx(25.0 * (1 - 1e-2), rel=1e-5)


@pytest.mark.parametrize("shape", [(4, 5), (1, 3, 5), (4, 1, 5), (2, 2, 2, 2)])
def test_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="projections"):
        MultiPatchVICRegLoss()(projections=torch.randn(shape))


def test_bad_args(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="var_cov"):
        MultiPatchVICRegLoss(var_cov="mean")
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        MultiPatchVICRegLoss(gather_distributed=True)
