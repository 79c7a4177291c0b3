"""Tests of CrossCropClsLoss and CrossImageClsLoss against loop references."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightly_cotap.loss.cross_crop_cls_loss import CrossCropClsLoss
from lightly_cotap.loss.cross_image_cls_loss import CrossImageClsLoss


def _log_softmax(x: Tensor) -> Tensor:
    return x - torch.log(torch.exp(x).sum())


def _cross_crop_reference(codes: Tensor, student: Tensor, temperature: float) -> Tensor:
    batch, g, _ = codes.shape
    v_count = student.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    for c in range(g):
        sub = torch.zeros((), dtype=torch.float64)
        for v in range(v_count):
            if v == c:
                continue
            ce = torch.zeros((), dtype=torch.float64)
            for b in range(batch):
                ce = (
                    ce - (codes[b, c] * _log_softmax(student[b, v] / temperature)).sum()
                )
            sub = sub + ce / batch
        total = total + sub / (v_count - 1)
    return total / g


def _cross_image_reference(
    q_x: Tensor, q_pos: Tensor, s_x: Tensor, s_pos: Tensor, temperature: float
) -> Tensor:
    batch, g, _ = q_x.shape
    terms = []
    for teacher, student in ((q_pos, s_x), (q_x, s_pos)):
        for b in range(batch):
            for i in range(g):
                for j in range(student.shape[1]):
                    log_p = _log_softmax(student[b, j] / temperature)
                    terms.append(-(teacher[b, i] * log_p).sum())
    return torch.stack(terms).mean()


def _codes(*shape: int, gen: torch.Generator) -> Tensor:
    return torch.softmax(torch.randn(*shape, generator=gen, dtype=torch.float64), -1)


@pytest.mark.parametrize("seed, crops", [(0, 6), (1, 2), (2, 3)])
def test_cross_crop_matches_reference(seed: int, crops: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = _codes(3, 2, 7, gen=gen)
    student = torch.randn(3, crops, 7, generator=gen, dtype=torch.float64)
    student.requires_grad_()
    loss = CrossCropClsLoss(temperature=0.1)(teacher_codes=codes, student=student)
    (grad,) = torch.autograd.grad(loss, student)
    expected = _cross_crop_reference(codes, student, 0.1)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert torch.allclose(loss, expected, rtol=1e-10)
    assert torch.allclose(grad, expected_grad, rtol=1e-8, atol=1e-12)


def test_cross_crop_errors() -> None:
    codes = torch.softmax(torch.randn(2, 2, 5), -1)
    loss_fn = CrossCropClsLoss()
    with pytest.raises(ValueError, match="student"):
        loss_fn(teacher_codes=codes, student=torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="student"):
        loss_fn(teacher_codes=codes, student=torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match="teacher_codes"):
        loss_fn(teacher_codes=codes[0], student=torch.randn(2, 6, 5))
    with pytest.raises(ValueError, match="At least 2"):
        loss_fn(teacher_codes=codes[:, :1], student=torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match="temperature"):
        CrossCropClsLoss(temperature=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_image_matches_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q_x, q_pos = _codes(4, 2, 6, gen=gen), _codes(4, 2, 6, gen=gen)
    s_x = torch.randn(4, 2, 6, generator=gen, dtype=torch.float64).requires_grad_()
    s_pos = torch.randn(4, 2, 6, generator=gen, dtype=torch.float64).requires_grad_()
    loss = CrossImageClsLoss(temperature=0.2)(
        teacher_codes_x=q_x, teacher_codes_pos=q_pos, student_x=s_x, student_pos=s_pos
    )
    grads = torch.autograd.grad(loss, [s_x, s_pos])
    expected = _cross_image_reference(q_x, q_pos, s_x, s_pos, 0.2)
    expected_grads = torch.autograd.grad(expected, [s_x, s_pos])
    assert torch.allclose(loss, expected, rtol=1e-10)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)


def test_cross_image_pairs_x_with_its_own_neighbour() -> None:
    """If the student on x predicts exactly x+'s teacher codes (and vice versa) the
    loss is lower than when the neighbours are shuffled across the batch.
    """
    gen = torch.Generator().manual_seed(3)
    q_x, q_pos = _codes(4, 2, 16, gen=gen), _codes(4, 2, 16, gen=gen)
    s_x = q_pos.log() * 0.2  # softmax(s / 0.2) = q_pos
    s_pos = q_x.log() * 0.2
    loss_fn = CrossImageClsLoss(temperature=0.2)
    matched = loss_fn(
        teacher_codes_x=q_x, teacher_codes_pos=q_pos, student_x=s_x, student_pos=s_pos
    )
    shuffled = loss_fn(
        teacher_codes_x=q_x,
        teacher_codes_pos=q_pos,
        student_x=s_x.roll(1, dims=0),
        student_pos=s_pos.roll(1, dims=0),
    )
    assert matched < shuffled


def test_cross_image_errors() -> None:
    q = torch.softmax(torch.randn(2, 2, 5), -1)
    s = torch.randn(2, 2, 5)
    loss_fn = CrossImageClsLoss()
    with pytest.raises(ValueError, match="teacher_codes_pos"):
        loss_fn(teacher_codes_x=q, teacher_codes_pos=q[:1], student_x=s, student_pos=s)
    with pytest.raises(ValueError, match="student_pos"):
        loss_fn(
            teacher_codes_x=q, teacher_codes_pos=q, student_x=s, student_pos=s[:, :1]
        )
    with pytest.raises(ValueError, match="student_x"):
        loss_fn(
            teacher_codes_x=q, teacher_codes_pos=q, student_x=s[..., :4], student_pos=s
        )
    with pytest.raises(ValueError, match="temperature"):
        CrossImageClsLoss(temperature=-1.0)
