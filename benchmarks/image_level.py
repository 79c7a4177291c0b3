"""Image-level kNN benchmark of the related methods against their base methods.

Each method is trained from the same initialisation, with the same batch size, number
of steps and optimiser as its base method, on real labelled photos, and evaluated by
kNN classification (Lightly's ``knn_predict``) of frozen backbone features:

============================  ===========================================
method                        base method
============================  ===========================================
DSA (``DSALoss``)             SimCLR (``NTXentLoss``)
semantic pairs (labels)       SimCLR (augmented pairs)
semantic pairs + class mask   SimCLR (augmented pairs)
CO-BYOL (``CoSSLLoss``)       BYOL (``NegativeCosineSimilarity``)
BagSSL (``MultiPatchVICReg``) VICReg (``VICRegLoss``)
============================  ===========================================

Data: the ~230 photographic Tux Paint stamps in 7 classes (Debian
``tuxpaint-stamps-default``; the class folders of
``lightly_cotap.data.tuxpaint_class_folders``, as built by
``benchmarks/prepare_copy_paste_scenes.py``, which this script calls when the folders
are missing). Every RGBA cut-out is composited onto a neutral grey square and resized
to ``--image-size``. A fixed stratified split (independent of the run seed) gives a
training half, used for pretraining and as the kNN bank, and a test half, used as kNN
queries. The semantic-pair runs use the *training labels* to form their pairs (that is
the method); all other runs are label-free.

Scale: a 4-block CNN (conv-BN-ReLU, widths w, 2w, 4w, 8w, strides 1, 2, 2, 2) at 32
px, since ResNet-18 at 64 px costs ~8 s per step on the shared 2-core machine; pass
``--backbone resnet18 --image-size 64`` on a bigger machine. Per-step cost is printed.

Usage::

    python benchmarks/image_level.py              # 3 seeds x 8 trainings x 80 steps
    python benchmarks/image_level.py --quick      # smoke run, ~30 s

Cost: about 0.3-0.4 s per step (DSA ~1.5x, its regulator scores N^2 differences and
the EMA reference embeds three views) on 2 idle cores, i.e. ~12 min; measured 40 min
while other jobs shared the 2 cores (2-5x slower steps).

The Markdown table is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
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
from lightly.utils.benchmarking import knn_predict
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightly_cotap.data import SemanticPairDataset, tuxpaint_class_folders
from lightly_cotap.loss import (
    ClassAwareNTXentLoss,
    CoSSLLoss,
    DSALoss,
    MultiPatchVICRegLoss,
)
from lightly_cotap.models.modules import (
    BagOfPatchesAggregator,
    CoSSLLocalPredictionHead,
    CoSSLLocalProjectionHead,
    DSARegulator,
    grid_patches,
)
from lightly_cotap.transforms import BagSSLTransform

DEFAULT_CACHE = Path.home() / ".cache/lightly_cotap/debian"


# ----------------------------------------------------------------------------- data
def load_stamps(objects: Path, cache: Path) -> tuple[list[Path], list[int], list[str]]:
    """Returns the cut-out paths, labels and class names; builds the folders if needed."""
    if not objects.is_dir() or not any(objects.iterdir()):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from prepare_copy_paste_scenes import fetch_debian_packages

        root = fetch_debian_packages(cache, apt_update=False, keep_debs=False)
        tuxpaint_class_folders(root / "usr/share/tuxpaint/stamps", objects)
    classes = sorted(p.name for p in objects.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((objects / name).glob("*.png")):
            paths.append(path)
            labels.append(label)
    if not paths:
        raise SystemExit(f"no cut-outs found in {objects}")
    return paths, labels, classes


def composite(path: Path, size: int) -> Image.Image:
    """The RGBA cut-out on a grey square, resized to ``size``."""
    with Image.open(path) as raw:
        rgba = raw.convert("RGBA")
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (128, 128, 128, 255))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def stratified_split(labels: list[int], seed: int = 0) -> tuple[list[int], list[int]]:
    """Half of every class for training, the rest for testing."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        half = (len(members) + 1) // 2
        train += members[:half]
        test += members[half:]
    return sorted(train), sorted(test)


class ImageList(Dataset[tuple[Any, int]]):
    """(image, label) pairs with an optional transform; ``targets`` for the pairs."""

    def __init__(
        self,
        images: list[Image.Image],
        labels: list[int],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.images = images
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image: Any = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def forever(loader: DataLoader[Any]) -> Iterator[Any]:
    while True:
        yield from loader


# ---------------------------------------------------------------------------- models
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
    torch.manual_seed(setup.seed)
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
    torch.manual_seed(setup.seed)
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
    torch.manual_seed(setup.seed)
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
    torch.manual_seed(setup.seed)
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
    torch.manual_seed(setup.seed)
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
    torch.manual_seed(setup.seed)
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


# ------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(
    trunk: nn.Module, images: Tensor, bag_patch_size: int | None = None
) -> Tensor:
    """Normalised features: global pooling, or the BagSSL mean over grid patches."""
    trunk.eval()
    if bag_patch_size is None:
        features = pooled(trunk, images)
    else:
        aggregator = BagOfPatchesAggregator(
            nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1)), chunk_size=512
        )
        patches = grid_patches(images, bag_patch_size, stride=bag_patch_size // 2)
        features = aggregator(patches)
    return F.normalize(features, dim=1)


def knn_accuracy(
    trunk: nn.Module,
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int,
    bag_patch_size: int | None = None,
) -> float:
    bank = embed(trunk, train, bag_patch_size)
    queries = embed(trunk, test, bag_patch_size)
    pred = knn_predict(
        queries, bank.T, train_labels, num_classes=num_classes, knn_k=k, knn_t=0.1
    )
    return float((pred[:, 0] == test_labels).float().mean()) * 100


# ------------------------------------------------------------------------------ main
@dataclass
class Row:
    name: str
    base: str | None
    accuracies: list[float] = field(default_factory=list)
    seconds_per_step: list[float] = field(default_factory=list)


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def markdown(rows: list[Row]) -> str:
    by_name = {r.name: r for r in rows}
    lines = [
        "| method | base | kNN top-1 % (mean ± std) | Δ vs base (paired) | per seed | s / step |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        delta = "—"
        if row.base is not None:
            base = by_name[row.base].accuracies
            diffs = [a - b for a, b in zip(row.accuracies, base)]
            delta = _fmt(diffs)
            delta = ("+" if statistics.fmean(diffs) >= 0 else "") + delta
        per_seed = ", ".join(f"{a:.1f}" for a in row.accuracies)
        speed = (
            f"{statistics.fmean(row.seconds_per_step):.2f}"
            if row.seconds_per_step
            else "—"
        )
        lines.append(
            f"| {row.name} | {row.base or '—'} | {_fmt(row.accuracies)} | {delta} "
            f"| {per_seed} | {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=Path, default=DEFAULT_CACHE / "objects")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--backbone", choices=("cnn", "resnet18"), default="cnn")
    parser.add_argument("--width", type=int, default=16, help="CNN base width")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--n-patches", type=int, default=4, help="BagSSL patches")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 seed")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/image_level.md"), help="table file"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds = 3, [0]
    torch.set_num_threads(max(1, torch.get_num_threads()))

    start = time.perf_counter()
    paths, labels, classes = load_stamps(args.objects, args.cache)
    images = [composite(p, args.image_size) for p in paths]
    train_idx, test_idx = stratified_split(labels, seed=0)
    to_tensor = T.Compose(
        [
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
        ]
    )
    all_tensors = torch.stack([to_tensor(im) for im in images])
    all_labels = torch.as_tensor(labels)
    train_x, test_x = all_tensors[train_idx], all_tensors[test_idx]
    train_y, test_y = all_labels[train_idx], all_labels[test_idx]
    counts = np.bincount(labels).tolist()
    print(
        f"{len(images)} stamps in {len(classes)} classes {dict(zip(classes, counts))}: "
        f"{len(train_idx)} train / {len(test_idx)} test, {args.image_size} px"
    )
    patch_size = args.image_size // 2

    rows = [
        Row("random init", None),
        Row("SimCLR", None),
        Row("DSA", "SimCLR"),
        Row("semantic pairs (labels)", "SimCLR"),
        Row("semantic pairs + class-aware mask", "SimCLR"),
        Row("BYOL", None),
        Row("CO-BYOL (w_s=0.3)", "BYOL"),
        Row("VICReg", None),
        Row("BagSSL (bag-of-patches eval)", "VICReg"),
        Row("BagSSL (whole-image eval)", "VICReg"),
    ]
    by_name = {r.name: r for r in rows}
    num_classes = len(classes)
    k = min(args.knn_k, len(train_idx))

    def evaluate(trunk: nn.Module, bag: int | None = None) -> float:
        return knn_accuracy(
            trunk, train_x, train_y, test_x, test_y, num_classes, k, bag_patch_size=bag
        )

    for seed in args.seeds:
        torch.manual_seed(seed)
        trunk, dim = make_backbone(args.backbone, args.width)
        setup = Setup(
            trunk_state=copy.deepcopy(trunk.state_dict()),
            backbone=args.backbone,
            width=args.width,
            dim=dim,
            train_images=[images[i] for i in train_idx],
            train_labels=[labels[i] for i in train_idx],
            image_size=args.image_size,
            batch_size=args.batch_size,
            steps=args.steps,
            lr=args.lr,
            seed=seed,
        )
        by_name["random init"].accuracies.append(evaluate(setup.trunk()))
        runs: list[tuple[str, Callable[..., tuple[nn.Module, float]], dict[str, Any]]]
        runs = [
            ("SimCLR", run_simclr, {}),
            ("DSA", run_dsa, {}),
            ("semantic pairs (labels)", run_semantic_pairs, {"class_aware": False}),
            (
                "semantic pairs + class-aware mask",
                run_semantic_pairs,
                {"class_aware": True},
            ),
            ("BYOL", run_byol, {"co_ssl": False}),
            ("CO-BYOL (w_s=0.3)", run_byol, {"co_ssl": True}),
            ("VICReg", run_vicreg, {}),
            (
                "BagSSL (bag-of-patches eval)",
                run_bagssl,
                {"n_patches": args.n_patches, "patch_size": patch_size},
            ),
        ]
        for name, run, kwargs in runs:
            trained, per_step = run(setup, **kwargs)
            row = by_name[name]
            if name.startswith("BagSSL"):
                row.accuracies.append(evaluate(trained, bag=patch_size))
                whole = by_name["BagSSL (whole-image eval)"]
                whole.accuracies.append(evaluate(trained))
            else:
                row.accuracies.append(evaluate(trained))
            row.seconds_per_step.append(per_step)
            print(
                f"seed {seed} {name:<36} kNN {row.accuracies[-1]:5.1f} %  "
                f"{per_step:.2f} s/step  [{time.perf_counter() - start:.0f} s]",
                flush=True,
            )

    table = markdown(rows)
    header = (
        f"Image-level kNN top-1 (k={k}, t=0.1) on {len(test_idx)} held-out Tux Paint "
        f"photo stamps ({num_classes} classes, bank = {len(train_idx)} training "
        f"stamps), {args.backbone} (width {args.width}) at {args.image_size} px, "
        f"{args.steps} Adam steps (lr {args.lr}) of batch {args.batch_size} from the "
        f"same initialisation per seed, seeds {args.seeds}; BagSSL: {args.n_patches} "
        f"patches of {patch_size} px. Δ: mean ± std over seeds of the paired "
        "difference to the base method."
    )
    print()
    print(header)
    print()
    print(table)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n\n" + table + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({r.name: r.accuracies for r in rows}, indent=2)
    )


if __name__ == "__main__":
    main()
