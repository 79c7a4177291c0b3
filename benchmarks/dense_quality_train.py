"""Trainings of the dense-quality benchmark.

Stage 1 (supervised or DINO from random initialisation) and the stage-2 methods:
DINO, DenseCL and CoTAP continued from P.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from dense_quality_config import Config
from dense_quality_data import SceneImages, loop, view_loader
from lightly.loss import DINOLoss, NTXentLoss
from lightly.models.modules.heads import DenseCLProjectionHead, DINOProjectionHead
from lightly.models.utils import (
    deactivate_requires_grad,
    select_most_similar,
    update_momentum,
)
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.scheduler import cosine_schedule
from lr_schedule import set_lr
from pytorch_lightning import seed_everything
from pytorch_lightning.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightly_cotap.data import SemanticPairDataset
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer


def backbone(cfg: Config, use_filter: bool, **kwargs: Any) -> CoTAPVisionTransformer:
    return CoTAPVisionTransformer(
        cfg.arch,
        use_filter=use_filter,
        conv_stem=cfg.conv_stem,
        depth=cfg.depth,
        patch_size=cfg.patch_size,
        img_size=cfg.global_crop,
        **kwargs,
    )


def optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.04)


def train_dino(
    model: CoTAPVisionTransformer,
    images: SceneImages,
    cfg: Config,
    lr: float,
    seed: int,
    steps: int,
) -> CoTAPVisionTransformer:
    """DINO-style image-level training (Lightly's DINO head and loss) of ``model``."""
    seed_everything(seed, verbose=False)

    def make_head() -> DINOProjectionHead:
        return DINOProjectionHead(model.out_dim, 256, 64, 1024, freeze_last_layer=1)

    head = make_head()
    student = nn.ModuleDict({"backbone": model, "head": head})
    # Lightly's DINO head uses torch weight_norm, which deepcopy does not support.
    teacher = nn.ModuleDict({"backbone": copy.deepcopy(model), "head": make_head()})
    teacher["head"].load_state_dict(head.state_dict())
    deactivate_requires_grad(teacher)
    student.to(cfg.device)
    teacher.to(cfg.device)
    criterion = DINOLoss(output_dim=1024, warmup_teacher_temp_epochs=0).to(cfg.device)
    loader = view_loader(images, cfg)
    opt = optimizer(list(student.parameters()), lr)
    student.train()
    for step, (views, _) in enumerate(loop(loader, steps)):
        views = move_data_to_device(views, cfg.device)
        set_lr(opt, step, steps, lr)
        update_momentum(student, teacher, cosine_schedule(step, steps, 0.99, 1.0))
        with torch.no_grad():
            t_out = [
                teacher["head"](teacher["backbone"](v).cls) for v in views["teacher"]
            ]
        s_out = [student["head"](student["backbone"](v).cls) for v in views["student"]]
        loss = criterion(t_out, s_out, epoch=0)
        opt.zero_grad()
        loss.backward()
        head.cancel_last_layer_gradients(current_epoch=0)
        opt.step()
    return model.eval()


def train_supervised(
    model: CoTAPVisionTransformer,
    images: list[Any],
    labels: list[int],
    cfg: Config,
    seed: int,
) -> CoTAPVisionTransformer:
    """Supervised stage 1: object class of the object-centric images.

    A linear classifier reads the mean of the patch features (global average
    pooling), so the class evidence has to be carried by the patch features that the
    dense evaluation reads, not only by the CLS token. Cross-entropy with label
    smoothing 0.1, random horizontal flips, AdamW with warm-up and cosine decay.
    """
    seed_everything(seed, verbose=False)
    x = torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in images])
    x = x.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8
    y = torch.tensor(labels)
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"], device=cfg.device)[:, None, None]
    std = torch.tensor(IMAGENET_NORMALIZE["std"], device=cfg.device)[:, None, None]
    head = nn.Linear(model.out_dim, int(y.max()) + 1)
    net = nn.ModuleDict({"backbone": model, "head": head}).to(cfg.device).train()
    opt = optimizer(list(net.parameters()), cfg.stage1_lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(cfg.stage1_steps):
        set_lr(opt, step, cfg.stage1_steps, cfg.stage1_lr)
        index = torch.randint(len(x), (cfg.stage1_batch_size,), generator=generator)
        batch = x[index].to(cfg.device).float().div(255)
        flip = torch.rand(len(batch), generator=generator) < 0.5
        flip = flip.to(cfg.device)[:, None, None, None]
        batch = torch.where(flip, batch.flip(3), batch)  # no boolean indexing (sync)
        logits = head(model((batch - mean) / std).dense.mean((1, 2)))
        loss = F.cross_entropy(logits, y[index].to(cfg.device), label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_densecl(
    model: CoTAPVisionTransformer,
    images: SceneImages,
    cfg: Config,
    lr: float,
    seed: int,
    steps: int,
) -> CoTAPVisionTransformer:
    """DenseCL [Wang et al., 2021] from Lightly's components (as Lightly's example)."""
    seed_everything(seed, verbose=False)
    dim = model.out_dim
    student = nn.ModuleDict(
        {
            "backbone": model,
            "global": DenseCLProjectionHead(dim, dim, 64),
            "local": DenseCLProjectionHead(dim, dim, 64),
        }
    )
    student.to(cfg.device)
    teacher = copy.deepcopy(student)
    deactivate_requires_grad(teacher)
    global_loss = NTXentLoss(temperature=0.2, memory_bank_size=(2048, 64))
    local_loss = NTXentLoss(temperature=0.2, memory_bank_size=(2048, 64))
    global_loss.to(cfg.device)
    local_loss.to(cfg.device)
    loader = view_loader(images, cfg)
    opt = optimizer(list(student.parameters()), lr)

    def embed(net: nn.ModuleDict, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dense = net["backbone"](x).dense.flatten(1, 2)  # (B, hw, C)
        return dense, net["global"](dense.mean(1)), net["local"](dense)

    for step, (views, _) in enumerate(loop(loader, steps)):
        views = move_data_to_device(views, cfg.device)
        set_lr(opt, step, steps, lr)
        update_momentum(student, teacher, cosine_schedule(step, steps, 0.99, 1.0))
        x0, x1 = views["student"][0], views["student"][1]
        q_dense, q_global, q_local = embed(student, x0)
        with torch.no_grad():
            k_dense, k_global, k_local = embed(teacher, x1)
            k_local = select_most_similar(q_dense, k_dense, k_local)
        loss = 0.5 * global_loss(q_global, k_global) + 0.5 * local_loss(
            q_local.flatten(0, 1), k_local.flatten(0, 1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_cotap(
    p_state: dict[str, Any],
    pairs: SemanticPairDataset,
    cfg: Config,
    lr: float,
    seed: int,
    cotap_weight: float,
    use_filter: bool = True,
) -> tuple[CoTAPVisionTransformer, dict[str, float]]:
    """CoTAP post-training from P with the recipe's LightningModule (manual loop).

    Returns:
        The trained backbone and the mean of every loss term over the last
        quarter of the steps.
    """
    from lightly_cotap.train.cotap_module import CoTAPModule

    seed_everything(seed, verbose=False)
    grid = cfg.global_crop // cfg.patch_size
    module = CoTAPModule(
        cfg.arch,
        backbone_kwargs=dict(
            depth=cfg.depth,
            patch_size=cfg.patch_size,
            img_size=cfg.global_crop,
            conv_stem=cfg.conv_stem,
        ),
        use_filter=use_filter,
        num_prototypes=16,
        head_hidden_dim=256,
        head_bottleneck_dim=64,
        patch_prototypes=64,
        cls_prototypes=256,
        objective_kwargs=dict(
            cotap_weight=cotap_weight,
            pool_sizes=(grid // 2, grid),
            roi_output_size=grid // 2,
            patch_queue_size=4096,
            patch_queue_update_size=256,
            cls_queue_size=1024,
            cls_queue_update_size=cfg.batch_size,
        ),
        prototype_bank_size=256,
        prototype_bank_update=cfg.batch_size,
        kmeans_iters=50,
        max_steps=cfg.steps,
    )
    module.load_backbone_weights(p_state)
    module.to(cfg.device)
    loader = DataLoader(pairs, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    student = module.student
    head_params = [
        p for n, p in student.named_parameters() if not n.startswith("backbone.")
    ]
    opt = optimizer(list(student.backbone.parameters()), lr)
    opt.add_param_group({"params": head_params, "lr": lr, "lr_scale": 10.0})
    opt.param_groups[0]["lr_scale"] = 1.0
    module.train()
    history: dict[str, list[float]] = {}
    for step, batch in enumerate(loop(loader, cfg.steps)):
        batch = move_data_to_device(batch, cfg.device)
        set_lr(opt, step, cfg.steps, lr)
        update_momentum(
            student, module.teacher, cosine_schedule(step, cfg.steps, 0.99, 1.0)
        )
        module.teacher.eval()
        total, terms = module.compute_losses(batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        if step >= cfg.steps - max(1, cfg.steps // 4):
            for name, value in terms.items():
                history.setdefault(name, []).append(float(value.detach()))
    return module.backbone.eval(), {
        name: statistics.mean(values) for name, values in history.items()
    }
