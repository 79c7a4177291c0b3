from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightly_cotap.loss import PrototypeEntropyLoss


def _reference(prototypes: Tensor, samples: Tensor, temperature: float) -> Tensor:
    """Mean over prototypes of the entropy of softmax_n(cos(P_m, s_n) / T), looped."""
    protos = prototypes.reshape(prototypes.shape[0], -1)
    entropies = []
    for p in protos:
        logits = []
        for s in samples:
            cos = (p * s).sum() / (
                torch.clamp(p.norm(), min=1e-5) * torch.clamp(s.norm(), min=1e-5)
            )
            logits.append(cos / temperature)
        z = torch.stack(logits)
        prob = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
        entropies.append(-(prob * torch.log(prob)).sum())
    return torch.stack(entropies).mean()


class TestPrototypeEntropyLoss:
    @pytest.mark.parametrize("four_dim", [True, False])
    @pytest.mark.parametrize("temperature", [0.1, 0.5])
    def test_value_and_gradients_match_reference(
        self, four_dim: bool, temperature: float
    ) -> None:
        torch.manual_seed(0)
        shape = (5, 4, 3, 3) if four_dim else (5, 36)
        prototypes = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        samples = torch.randn(7, 36, dtype=torch.float64, requires_grad=True)
        loss = PrototypeEntropyLoss(temperature=temperature)(
            prototypes=prototypes, samples=samples
        )
        grads = torch.autograd.grad(loss, (prototypes, samples))

        p_ref = prototypes.detach().clone().requires_grad_(True)
        s_ref = samples.detach().clone().requires_grad_(True)
        ref = _reference(p_ref, s_ref, temperature)
        ref_grads = torch.autograd.grad(ref, (p_ref, s_ref))
        assert loss.shape == torch.Size([])
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-12)

    def test_float32(self) -> None:
        torch.manual_seed(1)
        p, s = torch.randn(4, 18), torch.randn(9, 18)
        loss = PrototypeEntropyLoss()(prototypes=p, samples=s)
        ref = _reference(p.double(), s.double(), 0.1)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)

    def test_ties_give_uniform_entropy(self) -> None:
        # Identical samples: every prototype is equally similar to all of them.
        samples = torch.randn(1, 12).repeat(6, 1)
        prototypes = torch.randn(3, 12, requires_grad=True)
        loss = PrototypeEntropyLoss()(prototypes=prototypes, samples=samples)
        assert loss.item() == pytest.approx(math.log(6), rel=1e-6)
        (grad,) = torch.autograd.grad(loss, prototypes)
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)

    def test_single_sample_and_bounds(self) -> None:
        loss_fn = PrototypeEntropyLoss()
        single = loss_fn(prototypes=torch.randn(4, 8), samples=torch.randn(1, 8))
        assert single.item() == pytest.approx(0.0, abs=1e-7)
        loss = loss_fn(prototypes=torch.randn(4, 8), samples=torch.randn(20, 8))
        assert 0.0 <= loss.item() <= math.log(20) + 1e-6

    def test_minimising_sharpens_prototypes(self) -> None:
        torch.manual_seed(2)
        samples = torch.randn(64, 16)
        prototypes = torch.randn(8, 16, requires_grad=True)
        loss_fn = PrototypeEntropyLoss()
        optimizer = torch.optim.SGD([prototypes], lr=1.0)
        first = loss_fn(prototypes=prototypes, samples=samples).item()
        for _ in range(50):
            optimizer.zero_grad()
            loss = loss_fn(prototypes=prototypes, samples=samples)
            loss.backward()
            optimizer.step()
        assert loss.item() < first

    def test_zero_norm_inputs_stay_finite(self) -> None:
        prototypes = torch.zeros(2, 6, requires_grad=True)
        samples = torch.cat([torch.zeros(1, 6), torch.randn(3, 6)])
        loss = PrototypeEntropyLoss()(prototypes=prototypes, samples=samples)
        loss.backward()
        assert torch.isfinite(loss)
        assert prototypes.grad is not None and torch.isfinite(prototypes.grad).all()

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_inputs_propagate(self, bad: float) -> None:
        samples = torch.randn(4, 6)
        samples[1, 2] = bad
        loss = PrototypeEntropyLoss()(prototypes=torch.randn(2, 6), samples=samples)
        assert not torch.isfinite(loss)

    def test_invalid_shapes(self) -> None:
        loss_fn = PrototypeEntropyLoss()
        with pytest.raises(ValueError, match="N >= 1"):
            loss_fn(prototypes=torch.randn(2, 6), samples=torch.randn(0, 6))
        with pytest.raises(ValueError, match="does not match"):
            loss_fn(prototypes=torch.randn(2, 4, 3, 3), samples=torch.randn(5, 35))
        with pytest.raises(ValueError, match="prototypes must have shape"):
            loss_fn(prototypes=torch.randn(2, 4, 3), samples=torch.randn(5, 12))
        with pytest.raises(ValueError, match="prototypes must have shape"):
            loss_fn(prototypes=torch.randn(0, 6), samples=torch.randn(5, 6))
        with pytest.raises(ValueError, match="samples must have shape"):
            loss_fn(prototypes=torch.randn(2, 6), samples=torch.randn(5, 2, 3))

    @pytest.mark.parametrize("temperature", [0.0, 1e-9, -0.1])
    def test_invalid_temperature(self, temperature: float) -> None:
        with pytest.raises(ValueError, match="temperature"):
            PrototypeEntropyLoss(temperature=temperature)
