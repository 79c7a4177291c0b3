"""Time per CoTAP training step: full objective vs. a DINO-style CLS loss only.

Both configurations run the SAME student / teacher forward passes on the SAME crops
(teacher on the 2 colour-free global crops of x and x+ with the foreground mask,
student on all global and local crops, patch and CLS heads) through
:class:`lightly_cotap.train.CoTAPModule`; they differ only in the loss:

- ``dino_cls``: only the cross-crop CLS distillation (SwAV/DINO style, Sinkhorn
  codes with the CLS queue) -- the baseline;
- ``cotap``: the full objective (CoTAP ranking, patch cluster, cross-crop CLS,
  cross-image CLS, prototype entropy, Sinkhorn queues).

A step is forward + backward + AdamW step + EMA update. Prints a Markdown table with
the median time per step and the ratio to the baseline, measured in this process
(target: the CoTAP losses add <= 20 %).

Usage:
    python benchmarks/train_step.py                      # small CPU setting
    python benchmarks/train_step.py --preset paper --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from lightly_cotap.train import CoTAPModule
from lightly_cotap.transforms import CoTAPTransform

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: ViT-S/16 on 96 / 48 px crops.
    "small": dict(
        backbone="vit_small_patch16_224",
        backbone_kwargs=dict(img_size=96),
        global_crop_size=96,
        local_crop_size=48,
        n_local_views=4,
        batch_size=8,
        pool_sizes=(3, 6),
        roi_output_size=3,
    ),
    # The paper's per-GPU setting: ViT-S/16, 224 / 96 px crops, 28 pairs.
    "paper": dict(
        backbone="vit_small_patch16_224",
        backbone_kwargs=dict(img_size=224),
        global_crop_size=224,
        local_crop_size=96,
        n_local_views=4,
        batch_size=28,
        pool_sizes=(7, 14),
        roi_output_size=6,
    ),
}


def fake_views(
    transform: CoTAPTransform, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Random crops with boxes sampled like CoTAPTransform's (no image decoding)."""
    boxes = torch.stack(
        [transform.sample_boxes(height=480, width=640) for _ in range(batch_size)]
    )
    return {
        "student": [
            torch.randn(batch_size, 3, size, size, device=device)
            for size in transform.crop_sizes
        ],
        "teacher": [
            torch.randn(batch_size, 3, size, size, device=device)
            for size in transform.crop_sizes[:2]
        ],
        "boxes": boxes.to(device),
        "flipped": torch.zeros(
            batch_size, transform.n_views, dtype=torch.bool, device=device
        ),
    }


def build_module(preset: dict[str, Any], full: bool) -> CoTAPModule:
    """The CoTAP module of a preset: the full objective or the DINO-style CLS loss.

    A preset's optional ``module_kwargs`` / ``objective_kwargs`` are passed on.
    """
    weights = (
        {}
        if full
        else dict(
            cotap_weight=0.0, patch_cluster_weight=0.0, cross_image_cls_weight=0.0
        )
    )
    return CoTAPModule(
        preset["backbone"],
        backbone_kwargs=preset["backbone_kwargs"],
        objective_kwargs=dict(
            pool_sizes=preset["pool_sizes"],
            roi_output_size=preset["roi_output_size"],
            **weights,
            **preset.get("objective_kwargs", {}),
        ),
        # A small bank so that the prototypes are initialised during warm-up and
        # the entropy loss is part of the timed steps.
        prototype_bank_size=64,
        prototype_bank_update=32,
        kmeans_iters=20,
        prototype_entropy_weight=1.0 if full else 0.0,
        max_steps=1000,
        **preset.get("module_kwargs", {}),
    )


def step_losses(
    module: CoTAPModule, batch: tuple[Any, ...], dtype: torch.dtype | None
) -> torch.Tensor:
    """The part of a step that must not synchronise: EMA update, forwards under
    autocast (``dtype`` None: float32), objective, backward. Returns the loss.
    """
    from lightly.models import utils

    utils.update_momentum(module.student, module.teacher, m=0.9997)
    device_type = batch[0]["boxes"].device.type
    with torch.autocast(
        device_type, dtype=dtype or torch.float32, enabled=dtype is not None
    ):
        loss, _ = module.compute_losses(batch)
    loss.backward()
    return loss


def train_steps(
    module: CoTAPModule,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Any, ...],
    steps: int,
    dtype: torch.dtype | None,
) -> list[float]:
    """Seconds of each of ``steps`` training steps (:func:`step_losses`, AdamW)."""
    device = batch[0]["boxes"].device
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step_losses(module, batch, dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def adamw(module: CoTAPModule) -> torch.optim.Optimizer:
    """AdamW over the trainable student parameters."""
    return torch.optim.AdamW(
        [p for p in module.student.parameters() if p.requires_grad], lr=1e-5
    )


def time_steps(
    module: CoTAPModule,
    batch: tuple[Any, ...],
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
) -> list[float]:
    """Seconds of each of ``steps`` training steps after ``warmup`` untimed ones."""
    module.to(device).train()
    optimizer = adamw(module)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return train_steps(module, optimizer, batch, warmup + steps, dtype)[warmup:]


def main() -> None:
    """Runs the benchmark and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    if args.batch_size is not None:
        preset["batch_size"] = args.batch_size
    device = torch.device(args.device)
    torch.manual_seed(0)
    transform = CoTAPTransform(
        global_crop_size=preset["global_crop_size"],
        local_crop_size=preset["local_crop_size"],
        n_local_views=preset["n_local_views"],
    )
    batch = (
        fake_views(transform, preset["batch_size"], device),
        fake_views(transform, preset["batch_size"], device),
    )
    results: dict[str, list[float]] = {}
    # Interleave the two configurations to spread machine noise over both.
    modules = {
        "dino_cls": build_module(preset, full=False),
        "cotap": build_module(preset, full=True),
    }
    for module in modules.values():
        time_steps(module, batch, 0, args.warmup, device, args.precision)
    for _ in range(2):
        for name, module in modules.items():
            results.setdefault(name, []).extend(
                time_steps(module, batch, args.steps, 0, device, args.precision)
            )
    base = statistics.median(results["dino_cls"])
    print(
        f"\npreset={args.preset} device={device} precision={args.precision} "
        f"batch={preset['batch_size']} pairs, crops {preset['global_crop_size']}/"
        f"{preset['local_crop_size']} px x (2 + {preset['n_local_views']}), "
        f"{len(results['dino_cls'])} timed steps each\n"
    )
    print("| loss | median s/step | ratio to dino_cls |")
    print("| --- | --- | --- |")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
