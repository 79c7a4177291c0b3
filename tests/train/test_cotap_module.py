from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.data.semantic_pairs import NeighborIndex, SemanticPairDataset
from lightly_cotap.loss.cotap_objective import TERM_NAMES
from lightly_cotap.train import CoTAPModule
from lightly_cotap.transforms import CoTAPTransform

TINY: dict[str, Any] = dict(
    backbone_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2),
    head_hidden_dim=32,
    head_bottleneck_dim=16,
    patch_prototypes=16,
    cls_prototypes=24,
    num_prototypes=4,
    prototype_bank_size=8,
    prototype_bank_update=4,
    kmeans_iters=5,
    objective_kwargs=dict(
        pool_sizes=(2, 4),
        roi_output_size=2,
        patch_queue_size=64,
        patch_queue_update_size=16,
        cls_queue_size=16,
        cls_queue_update_size=4,
    ),
    max_steps=10,
)


def _batch(batch_size: int = 3, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    base = SampleImageDataset()
    index = NeighborIndex(
        [[(i + 1) % len(base), (i + 2) % len(base)] for i in range(len(base))]
    )
    pairs = SemanticPairDataset(
        base,
        neighbors=index,
        transform=CoTAPTransform(
            global_crop_size=32, local_crop_size=16, n_local_views=2
        ),
    )
    return next(iter(DataLoader(pairs, batch_size=batch_size)))


def test_forward_pair_puts_every_crop_of_every_image_in_its_place() -> None:
    torch.manual_seed(0)
    module = CoTAPModule("vit_tiny_patch16_224", **TINY).eval()
    views, views_pos = _batch()[:2]
    x, pos, _ = module.forward_pair(views, views_pos)
    assert x.teacher_patch.shape == (3, 2, 4, 4, 16)
    assert x.student_cls.shape == (3, 4, 24)
    assert x.student_patch_local is not None
    assert x.student_patch_local.shape == (3, 2, 2, 2, 16)
    with torch.no_grad():
        for side, source in ((x, views), (pos, views_pos)):
            for crop in range(2):
                t_patch, t_cls, t_fg, _ = module.teacher(
                    source["teacher"][crop], return_fg_mask=True
                )
                s_patch, s_cls, _, _ = module.student(source["student"][crop])
                assert torch.allclose(side.teacher_patch[:, crop], t_patch, atol=1e-5)
                assert torch.allclose(side.teacher_cls[:, crop], t_cls, atol=1e-5)
                assert t_fg is not None
                assert torch.equal(side.fg_mask[:, crop], t_fg)
                assert torch.allclose(
                    side.student_patch_global[:, crop], s_patch, atol=1e-5
                )
                assert torch.allclose(side.student_cls[:, crop], s_cls, atol=1e-5)
            for local in range(2):
                s_patch, s_cls, _, _ = module.student(source["student"][2 + local])
                assert side.student_patch_local is not None
                assert torch.allclose(
                    side.student_patch_local[:, local], s_patch, atol=1e-5
                )
                assert torch.allclose(side.student_cls[:, 2 + local], s_cls, atol=1e-5)
            assert torch.equal(side.crop_boxes, source["boxes"])


def test_prototypes_initialised_from_bank_and_copied_to_teacher() -> None:
    torch.manual_seed(0)
    module = CoTAPModule("vit_tiny_patch16_224", **TINY)
    batch = _batch(batch_size=2)
    _, terms = module.compute_losses(batch)  # 2 * 2 * 2 = 8 samples: bank full
    assert "prototype_entropy" not in terms
    assert module.prototype_bank is not None and module.prototype_bank.is_full
    total, terms = module.compute_losses(batch)
    assert module.backbone.prototypes_initialized
    assert torch.equal(module.teacher.backbone.prototypes, module.backbone.prototypes)
    assert "prototype_entropy" in terms
    total.backward()
    assert module.backbone.prototypes.grad is not None


def test_optimizer_groups_and_schedules() -> None:
    module = CoTAPModule("vit_tiny_patch16_224", **TINY)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["backbone"]["lr"] == 3e-5 and groups["heads"]["lr"] == 3e-4
    assert groups["backbone_no_weight_decay"]["weight_decay"] == 0.0
    backbone_params = {id(p) for p in module.backbone.parameters() if p.requires_grad}
    grouped = {
        id(p)
        for name in ("backbone", "backbone_no_weight_decay")
        for p in groups[name]["params"]
    }
    assert grouped == backbone_params
    assert id(module.backbone.prototypes) in {
        id(p) for p in groups["backbone"]["params"]
    }
    # No norm / bias parameter is decayed.
    decayed = {id(p) for p in groups["backbone"]["params"]}
    for name, param in module.backbone.named_parameters():
        if name.endswith("bias") or "norm" in name:
            assert id(param) not in decayed, name
    scheduler = config["lr_scheduler"]["scheduler"]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-6)
    assert module.teacher.backbone.vit.blocks[0].attn.qkv.weight.requires_grad is False


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="backbone_lr"):
        CoTAPModule("vit_tiny_patch16_224", **dict(TINY, backbone_lr=0.0))
    with pytest.raises(ValueError, match="momentum_start"):
        CoTAPModule("vit_tiny_patch16_224", **dict(TINY, momentum_start=1.5))


def test_load_backbone_weights_into_student_and_teacher(tmp_path: Path) -> None:
    from lightly_cotap.export import export_backbone

    torch.manual_seed(0)
    source = CoTAPModule("vit_tiny_patch16_224", **TINY)
    export_backbone(source.backbone, tmp_path / "backbone.pth")
    torch.manual_seed(1)
    module = CoTAPModule("vit_tiny_patch16_224", **TINY)
    module.load_backbone_weights(tmp_path / "backbone.pth")
    for name, value in source.backbone.state_dict().items():
        assert torch.equal(module.backbone.state_dict()[name], value), name
        assert torch.equal(module.teacher.backbone.state_dict()[name], value), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_autocast_step_matches_float32(seed: int) -> None:
    """A bf16-autocast step gives the float32 step's terms and gradients.

    The teacher's foreground masks threshold its attention, so bf16 rounding flips a
    few cells; both steps use the float32 masks to compare like with like.
    """
    torch.manual_seed(seed)
    module = CoTAPModule("vit_tiny_patch16_224", **TINY)
    module_bf16 = copy.deepcopy(module)
    batch = _batch(batch_size=2, seed=seed)
    with torch.no_grad():
        x, pos, _ = module.forward_pair(batch[0], batch[1])
    forward_pair = module_bf16.forward_pair

    def float32_masks(*args: Any) -> Any:
        x_bf16, pos_bf16, bank_features = forward_pair(*args)
        return (
            dataclasses.replace(x_bf16, fg_mask=x.fg_mask),
            dataclasses.replace(pos_bf16, fg_mask=pos.fg_mask),
            bank_features,
        )

    module_bf16.forward_pair = float32_masks  # type: ignore[method-assign,assignment]
    torch.manual_seed(5)
    total, terms = module.compute_losses(batch)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total_bf16, terms_bf16 = module_bf16.compute_losses(batch)
    assert set(terms_bf16) == set(terms) == set(TERM_NAMES)
    for name, value in terms.items():
        assert terms_bf16[name].dtype == torch.float32, name
        torch.testing.assert_close(terms_bf16[name], value, rtol=2e-2, atol=0.0)
    torch.testing.assert_close(total_bf16, total, rtol=1e-2, atol=0.0)
    total.backward()
    total_bf16.backward()
    grads = [
        (p.grad.flatten(), q.grad.flatten())
        for p, q in zip(module.parameters(), module_bf16.parameters())
        if p.grad is not None and q.grad is not None
    ]
    grad = torch.cat([g for g, _ in grads])
    grad_bf16 = torch.cat([g.float() for _, g in grads])
    assert float(torch.cosine_similarity(grad, grad_bf16, dim=0)) > 0.99
