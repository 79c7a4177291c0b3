from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor

from lightly_cotap.loss.correspondence_criteria import SimilarityKLLoss
from lightly_cotap.loss.cotap_loss import CoTAPLoss
from lightly_cotap.loss.cotap_objective import CoTAPObjective, CoTAPViewOutputs
from lightly_cotap.loss.cross_crop_cls_loss import CrossCropClsLoss
from lightly_cotap.loss.cross_image_cls_loss import CrossImageClsLoss
from lightly_cotap.loss.patch_cluster_loss import PatchClusterLoss
from lightly_cotap.loss.sinkhorn_codes import SinkhornCodes

B, G, L, KP, KC, H, HL = 3, 2, 2, 8, 12, 4, 2
BOXES = torch.tensor(
    [[0, 0, 12, 12], [4, 4, 16, 16], [4, 4, 8, 8], [8, 0, 12, 4]], dtype=torch.float32
)


def _side(gen: torch.Generator) -> CoTAPViewOutputs:
    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).tanh()

    return CoTAPViewOutputs(
        student_patch_global=randn(B, G, H, H, KP).requires_grad_(),
        student_cls=randn(B, G + L, KC).requires_grad_(),
        teacher_patch=randn(B, G, H, H, KP),
        teacher_cls=randn(B, G, KC),
        fg_mask=torch.rand(B, G, H, H, generator=gen),
        crop_boxes=BOXES.expand(B, -1, -1).clone(),
        student_patch_local=randn(B, L, HL, HL, KP).requires_grad_(),
    )


def _objective(**kwargs: Any) -> CoTAPObjective:
    return CoTAPObjective(
        patch_prototypes=KP,
        cls_prototypes=KC,
        pool_sizes=(2, 4),
        top_k=3,
        num_negatives=B - 1,
        roi_output_size=2,
        fg_threshold=0.5,
        patch_queue_size=64,
        patch_queue_update_size=16,
        cls_queue_size=8,
        cls_queue_update_size=4,
        **kwargs,
    )


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor:
    assert a is not None and b is not None
    return torch.cat([a, b])


def test_terms_equal_the_components_and_total_is_weighted_sum() -> None:
    gen = torch.Generator().manual_seed(0)
    x, pos = _side(gen), _side(gen)
    weights = dict(
        cotap_weight=0.5,
        patch_cluster_weight=2.0,
        cross_crop_cls_weight=1.0,
        cross_image_cls_weight=0.25,
    )
    objective = _objective(**weights)
    components = objective.forward_components(x=x, pos=pos)
    total, terms = components.total, components.terms()
    assert set(terms) == {"cotap", "patch_cluster", "cross_crop_cls", "cross_image_cls"}
    # forward is the total of forward_components (same draws, queues left as they are).
    torch.manual_seed(0)
    plain = objective(x=x, pos=pos, update_queues=False)
    torch.manual_seed(0)
    again = objective.forward_components(x=x, pos=pos, update_queues=False).total
    assert torch.equal(plain, again)

    expected_cotap = CoTAPLoss(pool_sizes=(2, 4), top_k=3, num_negatives=B - 1)(
        student_x=x.student_patch_global,
        student_pos=pos.student_patch_global,
        teacher_x=x.teacher_patch,
        teacher_pos=pos.teacher_patch,
        fg_mask_x=x.fg_mask,
        fg_mask_pos=pos.fg_mask,
    )
    teacher_patch = _cat(x.teacher_patch, pos.teacher_patch)
    codes = SinkhornCodes(num_prototypes=KP, queue_size=0, epsilon=0.05)(
        teacher_patch.reshape(-1, KP)
    )
    codes = codes.reshape(2 * B, G, H, H, KP)
    expected_patch = PatchClusterLoss(output_size=2, fg_threshold=0.5)(
        teacher_codes=codes,
        student_global=_cat(x.student_patch_global, pos.student_patch_global),
        student_local=_cat(x.student_patch_local, pos.student_patch_local),
        crop_boxes=_cat(x.crop_boxes, pos.crop_boxes),
        fg_mask=_cat(x.fg_mask, pos.fg_mask),
    )
    cls_codes = SinkhornCodes(num_prototypes=KC, queue_size=0, epsilon=0.07)(
        _cat(x.teacher_cls, pos.teacher_cls).reshape(-1, KC)
    ).reshape(2 * B, G, KC)
    expected_crop = CrossCropClsLoss()(
        teacher_codes=cls_codes, student=_cat(x.student_cls, pos.student_cls)
    )
    expected_image = CrossImageClsLoss()(
        teacher_codes_x=cls_codes[:B],
        teacher_codes_pos=cls_codes[B:],
        student_x=x.student_cls[:, :G],
        student_pos=pos.student_cls[:, :G],
    )
    for name, expected in (
        ("cotap", expected_cotap),
        ("patch_cluster", expected_patch),
        ("cross_crop_cls", expected_crop),
        ("cross_image_cls", expected_image),
    ):
        assert torch.allclose(terms[name], expected, rtol=1e-5), name
    expected_total = (
        0.5 * expected_cotap
        + 2.0 * expected_patch
        + 1.0 * expected_crop
        + 0.25 * expected_image
    )
    assert torch.allclose(total, expected_total, rtol=1e-5)
    total.backward()
    for side in (x, pos):
        for tensor in (
            side.student_patch_global,
            side.student_cls,
            side.student_patch_local,
        ):
            assert tensor is not None and tensor.grad is not None
            assert tensor.grad.abs().sum() > 0


def test_queues_fill_with_foreground_and_are_used() -> None:
    gen = torch.Generator().manual_seed(1)
    x, pos = _side(gen), _side(gen)
    objective = _objective()
    first = objective.forward_components(x=x, pos=pos).terms()
    assert int(objective.patch_codes.num_filled) == 16
    assert int(objective.cls_codes.num_filled) == 4
    # Queued patch scores are foreground ones (mask > 0.5).
    teacher = torch.cat([x.teacher_patch, pos.teacher_patch])  # (2B, G, H, H, KP)
    fg = torch.cat([x.fg_mask, pos.fg_mask]) > 0.5
    foreground_rows = {tuple(r) for r in teacher[fg].tolist()}
    assert all(
        tuple(r) in foreground_rows for r in objective.patch_codes.queue.tolist()
    )
    # With a non-empty queue the codes (and the cluster terms) change.
    second = objective.forward_components(x=x, pos=pos, update_queues=False).terms()
    assert not torch.allclose(first["patch_cluster"], second["patch_cluster"])
    assert torch.allclose(first["cotap"], second["cotap"])


def test_zero_weights_skip_terms() -> None:
    gen = torch.Generator().manual_seed(2)
    x, pos = _side(gen), _side(gen)
    objective = _objective(
        cotap_weight=0.0, patch_cluster_weight=0.0, cross_image_cls_weight=0.0
    )
    components = objective.forward_components(x=x, pos=pos)
    total, terms = components.total, components.terms()
    assert set(terms) == {"cross_crop_cls"}
    assert components.cotap is None and components.patch_cluster is None
    assert torch.allclose(total, terms["cross_crop_cls"])
    assert int(objective.patch_codes.num_filled) == 0


def test_errors() -> None:
    gen = torch.Generator().manual_seed(3)
    x, pos = _side(gen), _side(gen)
    objective = _objective()
    bad = dataclasses.replace(pos, fg_mask=pos.fg_mask[:, :1])
    with pytest.raises(ValueError, match="fg_mask"):
        objective(x=x, pos=bad)
    bad = dataclasses.replace(pos, student_patch_local=None)
    with pytest.raises(ValueError, match="student_patch_local"):
        objective(x=x, pos=bad)
    with pytest.raises(ValueError, match="cotap_weight"):
        CoTAPObjective(cotap_weight=-1.0)


def test_criterion_reaches_the_cotap_term() -> None:
    gen = torch.Generator().manual_seed(3)
    x, pos = _side(gen), _side(gen)
    criterion = SimilarityKLLoss()
    objective = _objective(criterion=criterion)
    assert objective.cotap_loss.criterion is criterion
    terms = objective.forward_components(x=x, pos=pos).terms()
    expected = CoTAPLoss(
        pool_sizes=(2, 4), top_k=3, num_negatives=B - 1, criterion=SimilarityKLLoss()
    )(
        student_x=x.student_patch_global,
        student_pos=pos.student_patch_global,
        teacher_x=x.teacher_patch,
        teacher_pos=pos.teacher_patch,
        fg_mask_x=x.fg_mask,
        fg_mask_pos=pos.fg_mask,
    )
    default = _objective().forward_components(x=x, pos=pos).cotap
    assert default is not None
    torch.testing.assert_close(terms["cotap"], expected)
    assert not torch.allclose(terms["cotap"], default)
