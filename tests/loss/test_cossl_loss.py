from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor, nn

from lightly_cotap.loss.cossl_loss import CoSSLLoss


def _cos(a: Tensor, b: Tensor) -> Tensor:
    out: Tensor = (a @ b) / (a.norm() * b.norm())
    return out


def _sum(values: list[Tensor]) -> Tensor:
    return torch.stack(values).sum()


def _byol_reference(
    p: list[Tensor], z: list[Tensor], lp: list[Tensor], lz: list[Tensor], w: float
) -> Tensor:
    """Loops over views, images and positions; (1 - w) L_g + w L_l."""
    pairs = [(0, 1), (1, 0)]
    batch, positions = lp[0].shape[0], lp[0].shape[1]
    g = _sum(
        [-_cos(p[s][b], z[t][b]) / batch for s, t in pairs for b in range(batch)]
    ) / len(pairs)
    loc = _sum(
        [
            -_cos(lp[s][b, i], lz[t][b]) / (batch * positions)
            for s, t in pairs
            for b in range(batch)
            for i in range(positions)
        ]
    ) / len(pairs)
    return (1 - w) * g + w * loc


def _rand(*shape: int, seed: int, grad: bool = True) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("w_s", [0.0, 0.3, 1.0])
def test_byol_mode_matches_reference(w_s: float) -> None:
    p = [_rand(4, 5, seed=0), _rand(4, 5, seed=1)]
    z = [_rand(4, 5, seed=2), _rand(4, 5, seed=3)]
    lp = [_rand(4, 3, 5, seed=4), _rand(4, 3, 5, seed=5)]
    lz = [_rand(4, 5, seed=6), _rand(4, 5, seed=7)]
    loss = CoSSLLoss(w_s=w_s)(
        global_online=p, global_target=z, local_online=lp, local_target=lz
    )
    expected = _byol_reference(p, z, lp, lz, w_s)
    torch.testing.assert_close(loss, expected)
    inputs = p + lp
    for g, rg in zip(
        torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)
    ):
        torch.testing.assert_close(g, rg)


def test_byol_mode_accepts_feature_maps_and_additive_weighting() -> None:
    p = [_rand(2, 4, seed=0), _rand(2, 4, seed=1)]
    z = [_rand(2, 4, seed=2, grad=False), _rand(2, 4, seed=3, grad=False)]
    maps = [_rand(2, 3, 2, 4, seed=4), _rand(2, 3, 2, 4, seed=5)]  # (B, H, W, D)
    lists = [m.flatten(1, 2) for m in maps]
    convex = CoSSLLoss(w_s=0.3).forward_components(
        global_online=p, global_target=z, local_online=maps
    )
    additive = CoSSLLoss(w_s=0.3, weighting="additive").forward_components(
        global_online=p, global_target=z, local_online=lists
    )
    torch.testing.assert_close(convex.local_loss, additive.local_loss)
    torch.testing.assert_close(
        additive.total, convex.global_loss + 0.3 * convex.local_loss
    )
    torch.testing.assert_close(
        convex.total, 0.7 * convex.global_loss + 0.3 * convex.local_loss
    )
    # No local_target: the local outputs are matched to the global targets.
    expected = _byol_reference(p, z, lists, z, 0.3)
    torch.testing.assert_close(convex.total, expected)


class _TinyBYOL(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.projection_head = BYOLProjectionHead(8, 16, 6)
        self.prediction_head = BYOLPredictionHead(6, 16, 6)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feature_map = self.backbone(x)
        y = feature_map.mean(dim=(2, 3))
        z = self.projection_head(y)
        p = self.prediction_head(z)
        # n = 1 local position with the *shared* global heads.
        local = F.adaptive_avg_pool2d(feature_map, 1).flatten(1)
        local_p = self.prediction_head(self.projection_head(local))
        return p, z.detach(), local_p[:, None, :]


@pytest.mark.parametrize("w_s", [0.3, 0.9])
def test_n1_with_shared_heads_reduces_to_byol(w_s: float) -> None:
    torch.manual_seed(0)
    model = _TinyBYOL()
    x0, x1 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    p0, z0, lp0 = model(x0)
    p1, z1, lp1 = model(x1)
    loss = CoSSLLoss(w_s=w_s)(
        global_online=[p0, p1], global_target=[z0, z1], local_online=[lp0, lp1]
    )
    criterion = NegativeCosineSimilarity()
    byol = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
    torch.testing.assert_close(loss, byol)
    params = list(model.parameters())
    for g, rg in zip(
        torch.autograd.grad(loss, params, retain_graph=True),
        torch.autograd.grad(byol, params),
    ):
        torch.testing.assert_close(g, rg)


def _infonce_reference(q: Tensor, k: Tensor, tau: float) -> Tensor:
    """Rows of q (Q, D) with labels given by row // (Q // B) against keys (B, D)."""
    batch = k.shape[0]
    per_image = q.shape[0] // batch
    total = torch.zeros((), dtype=q.dtype)
    for a in range(q.shape[0]):
        logits = torch.stack([_cos(q[a], k[b]) / tau for b in range(batch)])
        total = total - torch.log_softmax(logits, dim=0)[a // per_image]
    return total / q.shape[0] * 2 * tau


def test_moco_mode_matches_reference() -> None:
    q = [_rand(5, 4, seed=0), _rand(5, 4, seed=1)]
    k = [_rand(5, 4, seed=2), _rand(5, 4, seed=3)]
    lq = [_rand(5, 3, 4, seed=4), _rand(5, 3, 4, seed=5)]
    loss = CoSSLLoss(w_s=0.4, mode="moco", temperature=0.3)(
        global_online=q, global_target=k, local_online=lq
    )
    g = 0.5 * (
        _infonce_reference(q[0], k[1], 0.3) + _infonce_reference(q[1], k[0], 0.3)
    )
    loc = 0.5 * (
        _infonce_reference(lq[0].flatten(0, 1), k[1], 0.3)
        + _infonce_reference(lq[1].flatten(0, 1), k[0], 0.3)
    )
    expected = 0.6 * g + 0.4 * loc
    torch.testing.assert_close(loss, expected)
    inputs = q + lq
    for gr, rg in zip(
        torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)
    ):
        torch.testing.assert_close(gr, rg)


def test_dino_mode_matches_reference_and_uses_center_before_update() -> None:
    k_dim, t_temp, s_temp = 7, 0.05, 0.2
    criterion = CoSSLLoss(
        w_s=0.3,
        mode="dino",
        dino_output_dim=k_dim,
        teacher_temp=t_temp,
        student_temp=s_temp,
        center_momentum=0.8,
    ).double()
    assert criterion.dino_loss is not None
    center = torch.randn(1, 1, k_dim, dtype=torch.float64)
    criterion.dino_loss.center.copy_(center)
    teacher = [_rand(3, k_dim, seed=0, grad=False), _rand(3, k_dim, seed=1, grad=False)]
    student = [
        _rand(3, k_dim, seed=2),
        _rand(3, k_dim, seed=3),
        _rand(3, k_dim, seed=4),
    ]
    local = [
        _rand(3, 2, k_dim, seed=5),
        _rand(3, 2, k_dim, seed=6),
        _rand(3, 2, k_dim, seed=7),
    ]
    loss = criterion(global_online=student, global_target=teacher, local_online=local)

    def ce(t: Tensor, s: Tensor) -> Tensor:
        p = torch.softmax((t - center.flatten()) / t_temp, dim=0)
        return -(p * torch.log_softmax(s / s_temp, dim=0)).sum()

    pairs = [(s, t) for s in range(3) for t in range(2) if s != t]
    g = _sum([ce(teacher[t][b], student[s][b]) for s, t in pairs for b in range(3)])
    g = g / (len(pairs) * 3)
    loc = _sum(
        [
            ce(teacher[t][b], local[s][b, i])
            for s, t in pairs
            for b in range(3)
            for i in range(2)
        ]
    ) / (len(pairs) * 6)
    expected = 0.7 * g + 0.3 * loc
    torch.testing.assert_close(loss, expected)
    inputs = student + local
    for gr, rg in zip(
        torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)
    ):
        torch.testing.assert_close(gr, rg)
    # The centre was updated once (by the global DINOLoss call).
    new_center = 0.8 * center + 0.2 * torch.cat(teacher).mean(dim=0)
    torch.testing.assert_close(criterion.dino_loss.center, new_center)


def test_bad_inputs() -> None:
    p = [torch.randn(4, 5), torch.randn(4, 5)]
    lp = [torch.randn(4, 3, 5), torch.randn(4, 3, 5)]
    criterion = CoSSLLoss()
    with pytest.raises(ValueError, match="at least two views"):
        criterion(global_online=p[:1], global_target=p[:1], local_online=lp[:1])
    with pytest.raises(ValueError, match="same number of views"):
        criterion(global_online=p, global_target=p[:1], local_online=lp)
    with pytest.raises(ValueError, match="one tensor per online view"):
        criterion(global_online=p, global_target=p, local_online=lp[:1])
    with pytest.raises(ValueError, match="global_target"):
        criterion(global_online=p, global_target=[p[0], p[1][:3]], local_online=lp)
    with pytest.raises(ValueError, match="local_online"):
        criterion(
            global_online=p, global_target=p, local_online=[lp[0], lp[1][..., :4]]
        )
    with pytest.raises(ValueError, match="at least 1 position"):
        criterion(global_online=p, global_target=p, local_online=[x[:, :0] for x in lp])
    with pytest.raises(ValueError, match="local_target"):
        criterion(global_online=p, global_target=p, local_online=lp, local_target=p[:1])
    with pytest.raises(ValueError, match="DINO"):
        CoSSLLoss(mode="dino", dino_output_dim=5)(
            global_online=p, global_target=p, local_online=lp, local_target=p
        )
    with pytest.raises(ValueError, match="mode"):
        CoSSLLoss(mode="simclr")
    with pytest.raises(ValueError, match="weighting"):
        CoSSLLoss(weighting="mean")
    with pytest.raises(ValueError, match="w_s"):
        CoSSLLoss(w_s=1.5)
    CoSSLLoss(w_s=1.5, weighting="additive")  # allowed
    with pytest.raises(ValueError, match="temperature"):
        CoSSLLoss(mode="moco", temperature=0.0)


def test_gather_distributed_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        CoSSLLoss(mode="moco", gather_distributed=True)
