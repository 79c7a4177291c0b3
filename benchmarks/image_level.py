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
the method); all other runs are label-free. Every training seeds torch, NumPy and
Python's ``random`` with the run seed (Lightly's solarization, rotation and blur draw
from NumPy's global generator), so a run repeats its numbers.

Scale: a 4-block CNN (conv-BN-ReLU, widths w, 2w, 4w, 8w, strides 1, 2, 2, 2) at 32
px, since ResNet-18 at 64 px costs ~8 s per step on the shared 2-core machine; pass
``--backbone resnet18 --image-size 64`` on a bigger machine. Per-step cost is printed.

Usage::

    python benchmarks/image_level.py              # 3 seeds x 8 trainings x 80 steps
    python benchmarks/image_level.py --quick      # smoke run, ~30 s

Cost: about 0.3-0.4 s per step (DSA ~1.5x, its regulator scores N^2 differences and
the EMA reference embeds three views) on 2 idle cores, i.e. ~12 min; measured 40 min
while other jobs shared the 2 cores (2-5x slower steps).

The Markdown table is printed and written to ``--out``. The script runs the seeds and
writes the table; ``image_level_data`` (stamps, split), ``image_level_methods``
(backbone, trainings), ``image_level_evaluate`` (kNN) and ``image_level_report``
(table) hold the work.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from copy_paste_inputs import CACHE
from image_level_data import composite, load_stamps, stratified_split
from image_level_evaluate import knn_accuracy
from image_level_methods import (
    Setup,
    make_backbone,
    run_bagssl,
    run_byol,
    run_dsa,
    run_semantic_pairs,
    run_simclr,
    run_vicreg,
)
from image_level_report import Row, markdown
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=Path, default=CACHE / "objects")
    parser.add_argument("--cache", type=Path, default=CACHE)
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
