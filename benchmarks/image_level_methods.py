"""Backbone and trainings of the image-level benchmark: the methods and their bases."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from image_level_data import ImageList, forever
from lightly.loss import NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from lightly.models.modules import (
    BarlowTwinsProjectionHead,
    BYOLPredictionHead,
    BYOLProjectionHead,
    SimCLRProjectionHead,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import SimCLRTransform, SimCLRViewTransform, VICRegTransform
from lightly.transforms.byol_transform import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
)
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from pytorch_lightning import seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightly_cotap.data import SemanticPairDataset
from lightly_cotap.loss import (
    ClassAwareNTXentLoss,
    CoSSLLoss,
    DSALoss,
    MultiPatchVICRegLoss,
)
from lightly_cotap.models.modules import (
    CoSSLLocalPredictionHead,
    CoSSLLocalProjectionHead,
    DSARegulator,
)
from lightly_cotap.transforms import BagSSLTransform


def make_backbone(name: str, width: int) -> tuple[nn.Module, int]:
    """A feature-map trunk (B, C, h, w) and its channel count C."""
    if name == "resnet18":
        resnet = torchvision.models.resnet18()
        return nn.Sequential(*list(resnet.children())[:-2]), 512

    def block(i: int, o: int, stride: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()
        )

    w = width
    trunk = nn.Sequential(
        block(3, w, 1),
        block(w, 2 * w, 2),
        block(2 * w, 4 * w, 2),
        block(4 * w, 8 * w, 2),
    )
    return trunk, 8 * w


def pooled(trunk: nn.Module, x: Tensor) -> Tensor:
    features: Tensor = trunk(x).mean(dim=(2, 3))
    return features


@dataclass
class Setup:
    """Everything a method needs; built once per seed."""

    trunk_state: dict[str, Tensor]
    backbone: str
    width: int
    dim: int
    train_images: list[Image.Image]
    train_labels: list[int]
    image_size: int
    batch_size: int
    steps: int
    lr: float
    seed: int
    normalize: dict[str, list[float]] = field(
        default_factory=lambda: IMAGENET_NORMALIZE
    )

    def trunk(self) -> nn.Module:
        trunk, _ = make_backbone(self.backbone, self.width)
        trunk.load_state_dict(self.trunk_state)
        return trunk

    def loader(self, dataset: Dataset[Any]) -> Iterator[Any]:
        g = torch.Generator().manual_seed(self.seed)
        return forever(
            DataLoader(
                dataset,
                batch_size=self.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=0,
                generator=g,
            )
        )


def _train(
    setup: Setup,
    modules: nn.Module,
    batches: Iterator[Any],
    step_fn: Callable[[Any, int], Tensor],
) -> float:
    """Runs ``steps`` Adam steps; returns the seconds per step."""
    optimizer = torch.optim.Adam(
        [p for p in modules.parameters() if p.requires_grad], lr=setup.lr
    )
    modules.train()
    start = time.perf_counter()
    for step in range(setup.steps):
        loss = step_fn(next(batches), step)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / setup.steps


def _simclr_views(setup: Setup) -> SimCLRTransform:
    return SimCLRTransform(
        input_size=setup.image_size,
        cj_strength=0.5,
        min_scale=0.2,
        gaussian_blur=0.0,
        normalize=setup.normalize,
    )


def run_simclr(setup: Setup) -> tuple[nn.Module, float]:
    seed_everything(setup.seed, verbose=False)
    trunk = setup.trunk()
    head = SimCLRProjectionHead(setup.dim, setup.dim, 64)
    model = nn.ModuleDict({"trunk": trunk, "head": head})
    criterion = NTXentLoss(temperature=0.5)
    data = ImageList(setup.train_images, setup.train_labels, _simclr_views(setup))

    def step(batch: Any, _: int) -> Tensor:
        x0, x1 = batch[0]
        loss: Tensor = criterion(head(pooled(trunk, x0)), head(pooled(trunk, x1)))
        return loss

    return trunk, _train(setup, model, setup.loader(data), step)


def run_dsa(setup: Setup) -> tuple[nn.Module, float]:
    seed_everything(setup.seed, verbose=False)
    trunk = setup.trunk()
    head = nn.Sequential(
        SimCLRProjectionHead(setup.dim, setup.dim, 64), nn.BatchNorm1d(64)
    )
    regulator = DSARegulator(input_dim=64)
    reference = copy.deepcopy(trunk)  # frozen EMA reference encoder
    deactivate_requires_grad(reference)
    model = nn.ModuleDict({"trunk": trunk, "head": head, "regulator": regulator})
    criterion = DSALoss(temperature=0.5, k=min(20, setup.batch_size - 1))
    origin = T.Compose(
        [
            T.ToTensor(),
            T.Normalize(mean=setup.normalize["mean"], std=setup.normalize["std"]),
        ]
    )
    views = _simclr_views(setup)
    transform = MultiViewTransform([*views.transforms, origin])
    data = ImageList(setup.train_images, setup.train_labels, transform)

    def step(batch: Any, index: int) -> Tensor:
        update_momentum(
            trunk, reference, m=cosine_schedule(index, setup.steps, 0.99, 1)
        )
        x0, x1, x_origin = batch[0]
        z0, z1 = head(pooled(trunk, x0)), head(pooled(trunk, x1))
        with torch.no_grad():
            reference.eval()
            refs = [pooled(reference, x) for x in (x0, x1, x_origin)]
        loss: Tensor = criterion(
            out0=z0,
            out1=z1,
            aggregation=regulator(z0, z1),
            reference0=refs[0],
            reference1=refs[1],
            reference_origin=refs[2],
        )
        return loss

    return trunk, _train(setup, model, setup.loader(data), step)


def run_semantic_pairs(setup: Setup, class_aware: bool) -> tuple[nn.Module, float]:
    seed_everything(setup.seed, verbose=False)
    trunk = setup.trunk()
    head = SimCLRProjectionHead(setup.dim, setup.dim, 64)
    model = nn.ModuleDict({"trunk": trunk, "head": head})
    criterion = ClassAwareNTXentLoss(temperature=0.5)
    view = SimCLRViewTransform(
        input_size=setup.image_size,
        cj_strength=0.5,
        min_scale=0.2,
        gaussian_blur=0.0,
        normalize=setup.normalize,
    )
    base = ImageList(setup.train_images, setup.train_labels)
    data = SemanticPairDataset(base, mode="labels", transform=view)
    labels = torch.as_tensor(setup.train_labels)

    def step(batch: Any, _: int) -> Tensor:
        x0, x1, index, _index_pos = batch
        loss: Tensor = criterion(
            head(pooled(trunk, x0)),
            head(pooled(trunk, x1)),
            labels=labels[index] if class_aware else None,
        )
        return loss

    return trunk, _train(setup, model, setup.loader(data), step)


def _byol_views(setup: Setup) -> BYOLTransform:
    kwargs: dict[str, Any] = dict(
        input_size=setup.image_size,
        min_scale=0.2,
        gaussian_blur=0.0,
        normalize=setup.normalize,
    )
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(**kwargs),
        view_2_transform=BYOLView2Transform(**kwargs),
    )


def run_byol(setup: Setup, co_ssl: bool) -> tuple[nn.Module, float]:
    seed_everything(setup.seed, verbose=False)
    trunk = setup.trunk()
    hidden, out = 2 * setup.dim, 64
    projection = BYOLProjectionHead(setup.dim, hidden, out)
    prediction = BYOLPredictionHead(out, hidden, out)
    local_projection = CoSSLLocalProjectionHead(setup.dim, hidden, out)
    local_prediction = CoSSLLocalPredictionHead(out, hidden, out)
    online = nn.ModuleDict(
        {
            "trunk": trunk,
            "projection": projection,
            "prediction": prediction,
            "local_projection": local_projection,
            "local_prediction": local_prediction,
        }
    )
    if not co_ssl:  # same initialisation; the local heads are simply unused
        for name in ("local_projection", "local_prediction"):
            deactivate_requires_grad(online[name])
    target = copy.deepcopy(online)
    deactivate_requires_grad(target)
    byol = NegativeCosineSimilarity()
    cossl = CoSSLLoss(w_s=0.3)
    data = ImageList(setup.train_images, setup.train_labels, _byol_views(setup))

    def step(batch: Any, index: int) -> Tensor:
        m = cosine_schedule(index, setup.steps, 0.99, 1)
        for name in ("trunk", "projection", "local_projection"):
            update_momentum(online[name], target[name], m=m)
        x0, x1 = batch[0]
        maps = [trunk(x) for x in (x0, x1)]
        preds = [prediction(projection(f.mean(dim=(2, 3)))) for f in maps]
        with torch.no_grad():
            ys = [target["trunk"](x).mean(dim=(2, 3)) for x in (x0, x1)]
            zs = [target["projection"](y) for y in ys]
            local_zs = [target["local_projection"](y) for y in ys]
        if not co_ssl:
            loss: Tensor = 0.5 * (byol(preds[0], zs[1]) + byol(preds[1], zs[0]))
            return loss
        local_preds = [
            local_prediction(
                local_projection(F.adaptive_avg_pool2d(f, 2).permute(0, 2, 3, 1))
            )
            for f in maps
        ]
        loss = cossl(
            global_online=preds,
            global_target=zs,
            local_online=local_preds,
            local_target=local_zs,
        )
        return loss

    return trunk, _train(setup, online, setup.loader(data), step)


def run_vicreg(setup: Setup) -> tuple[nn.Module, float]:
    seed_everything(setup.seed, verbose=False)
    trunk = setup.trunk()
    head = BarlowTwinsProjectionHead(setup.dim, 512, 512)
    model = nn.ModuleDict({"trunk": trunk, "head": head})
    criterion = VICRegLoss()
    transform = VICRegTransform(
        input_size=setup.image_size,
        min_scale=0.2,
        gaussian_blur=0.0,
        normalize=setup.normalize,
    )
    data = ImageList(setup.train_images, setup.train_labels, transform)

    def step(batch: Any, _: int) -> Tensor:
        x0, x1 = batch[0]
        loss: Tensor = criterion(head(pooled(trunk, x0)), head(pooled(trunk, x1)))
        return loss

    return trunk, _train(setup, model, setup.loader(data), step)


def run_bagssl(
    setup: Setup, n_patches: int, patch_size: int
) -> tuple[nn.Module, float]:
    seed_everything(setup.seed, verbose=False)
    trunk = setup.trunk()
    head = BarlowTwinsProjectionHead(setup.dim, 512, 512)
    model = nn.ModuleDict({"trunk": trunk, "head": head})
    criterion = MultiPatchVICRegLoss()
    transform = BagSSLTransform(
        n_patches=n_patches,
        patch_size=patch_size,
        image_size=None,
        cj_strength=0.5,
        gaussian_blur=0.0,
        normalize=setup.normalize,
    )
    data = ImageList(setup.train_images, setup.train_labels, transform)

    def step(batch: Any, _: int) -> Tensor:
        patches = batch[0]
        z = head(pooled(trunk, torch.cat(patches)))  # (n * B, D), patch-major
        z = z.reshape(len(patches), -1, z.shape[-1]).transpose(0, 1)
        loss: Tensor = criterion(projections=z)
        return loss

    return trunk, _train(setup, model, setup.loader(data), step)
