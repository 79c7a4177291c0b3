"""Dense-feature quality of CoTAP post-training on real copy-paste scenes.

Mirrors the paper's protocol [0] (CoTAP continues an image-level checkpoint trained on
object-centric images, then trains on scene-centric images), at a scale that runs on a
2-core CPU:

- stage 1 on **object-centric** images (one train-split cut-out per image, centred and
  large, on a :class:`~lightly_cotap.data.background_views.BackgroundView`: procedural
  textures or strongly augmented photo crops, so no background repeats recognisably):
  a tiny ViT (timm ``vit_tiny``, depth 4, patch 8, with a convolutional stem:
  :class:`~lightly_cotap.models.modules.conv_stem.ConvStem`, which learns from scratch
  several times faster than a patchify projection at this scale) is trained from
  random initialisation -> checkpoint P (``--stage1-steps``). ``--stage1 dino`` is the
  self-supervised objective (Lightly's ``DINOProjectionHead`` + ``DINOLoss``, EMA
  teacher, multi-crop); ``--stage1 supervised`` (the default) trains on the image's
  object class and stands in for the supervised / ImageNet-scale pretraining that
  cannot be run from scratch on a CPU; every table names which one was used.
  ``--stage1-checkpoint FILE`` skips the training and starts every seed from FILE.
  ``--stage1-objects DIR`` trains stage 1 on a larger object pool instead of the
  train-split cut-outs (``stage1_objects`` of ``prepare_copy_paste_scenes.py``: every
  Tux Paint stamp with an alpha channel except the test cut-outs and their variants,
  labelled by stamp folder); ``--stage1-only`` stops after stage 1 and the gate;
- a gate: P's patch features must beat the random initialisation by at least
  ``GATE`` points on the object / background probe and on linear-probe mIoU (mean over
  seeds). Stage 2 only means something above the gate; the report says which side
  every seed's P is on;
- stage 2 on **scenes** (1-3 objects per image, the same augmented backgrounds)
  continues from P for the same, smaller number of steps (``--steps``; CoTAP is a
  short continued training) with
  (a) the DINO objective only,
  (b) the full CoTAP objective (:class:`~lightly_cotap.train.cotap_module.CoTAPModule`:
      CoTAP ranking + patch cluster + CLS terms + object-aware filter, positives
      from a :class:`~lightly_cotap.data.NeighborIndex` of P's CLS embeddings through
      :class:`~lightly_cotap.data.SemanticPairDataset`),
  (c) the same without the ranking loss (``cotap_weight=0``),
  (d) DenseCL built from Lightly's components (``DenseCLProjectionHead``,
      ``NTXentLoss`` with memory banks, ``select_most_similar``, EMA key encoder),
  (e) the full CoTAP objective without the object-aware filter,
  (b') a diagnostic: (b) with positives that share the scene's largest object class
      (from the labels, ``SemanticPairDataset(labels=...)``) instead of P's
      neighbours;
- the random initialisation, P and every stage-2 model are evaluated with
  :func:`~lightly_cotap.eval.evaluate_dense` on disjoint test scenes (unseen objects
  and unseen background photos): linear-probe (BatchNorm + 1x1 conv), k-means
  (K = classes, Hungarian) and retrieval mIoU, and a class-agnostic object /
  background linear probe; mean and standard deviation over seeds, and the per-seed
  linear-probe differences of (b) against the others;
- diagnostics: how often P's neighbours share the background photo or an object class
  (against chance), and CoTAP's loss terms over the last quarter of its steps.

All stage-2 runs share the crops (:class:`~lightly_cotap.transforms.CoTAPTransform`),
the optimiser (AdamW, cosine learning rate) and the number of steps. Every (seed,
stage) is one task on a pool of ``--jobs`` single-threaded processes (on 2 cores, two
one-thread processes do more work than one two-thread process).

Measured cost on the shared 2-core machine (batch 16, 64 px crops, one thread per
process, two processes): about 1.6 s per DINO step, 4-5 s per CoTAP step (two images
per item, teacher + student, five loss terms), 0.5 s per DenseCL step and 15-30 s per
evaluation. Usage::

    python benchmarks/dense_quality.py                  # 3 seeds, <= 60 min on 2 cores
    python benchmarks/dense_quality.py --quick          # smoke run, ~1 min
    python benchmarks/dense_quality.py --preset gpu     # larger ViT / images, one GPU
    python benchmarks/dense_quality.py --stage1-checkpoint out/stage1/seed0.pth

The object cut-outs and backgrounds come from
``benchmarks/prepare_copy_paste_scenes.py`` (``--objects`` / ``--backgrounds``
default to its cache folders). The table is printed and written to ``--out`` with
``results.json`` (per row and seed every metric, the gate and its verdict, the
settings), the stage-1 checkpoints (``stage1/seed<N>.pth``) and ``pca.png`` (PCA of
the dense features of P, (a) and (b) on test scenes).

The script parses the command line and writes the report files; the work is done
in ``dense_quality_config`` (presets, rows, gate), ``dense_quality_data`` (images),
``dense_quality_train`` (stage-1 and stage-2 objectives), ``dense_quality_evaluate``
(metrics and diagnostics), ``dense_quality_tasks`` (the stage-1 / stage-2 tasks on
the process pool) and ``dense_quality_report`` (tables, gate text, PCA figure).

- [0]: Wen et al., Semantic Concentration for Self-Supervised Dense Representations
  Learning, 2025, https://arxiv.org/abs/2509.09429
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from copy_paste_inputs import add_input_arguments, check_input_folders
from dense_quality_config import (
    DEFAULT_METHODS,
    PRESETS,
    STAGE1_LABELS,
    STAGE2_METHODS,
    Paths,
)
from dense_quality_report import (
    diagnostics,
    gate,
    gate_text,
    paired_differences,
    pca_figure,
    per_seed_scores,
    table,
)
from dense_quality_tasks import run

from lightly_cotap.atomic_write import write_text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_input_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="Sizes of the run: 'cpu' (<= 60 min on 2 cores), 'gpu' (one GPU, "
        "larger ViT and images), 'quick' (smoke run).",
    )
    parser.add_argument("--quick", action="store_true", help="Same as --preset quick.")
    parser.add_argument(
        "--stage1",
        choices=("supervised", "dino"),
        default=None,
        help="Stage-1 objective (default: the preset's, supervised).",
    )
    parser.add_argument(
        "--stage1-checkpoint",
        type=Path,
        default=None,
        help="Start every seed from this P (e.g. OUT/stage1/seed0.pth) instead of "
        "training stage 1.",
    )
    parser.add_argument(
        "--stage1-objects",
        type=Path,
        default=None,
        help="Train stage 1 on every cut-out of this pool (class folders without "
        "the test objects, e.g. CACHE/stage1_objects from "
        "prepare_copy_paste_scenes.py) instead of the train split of --objects.",
    )
    parser.add_argument("--stage1-steps", type=int, default=None)
    parser.add_argument(
        "--stage1-images",
        type=int,
        default=None,
        help="Object-centric images rendered for stage 1.",
    )
    parser.add_argument(
        "--stage1-only",
        action="store_true",
        help="Stop after stage 1 and the gate (no stage-2 runs).",
    )
    parser.add_argument("--steps", type=int, default=None, help="Stage-2 steps.")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=STAGE2_METHODS,
        default=list(DEFAULT_METHODS),
        help="Stage-2 runs.",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="Worker processes (1 thread each on the CPU; default 2, 1 on a GPU).",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/dense_quality"))
    args = parser.parse_args()
    check_input_folders(parser, args)
    if args.stage1_objects is not None and not args.stage1_objects.is_dir():
        parser.error(f"--stage1-objects {args.stage1_objects} is not a folder.")
    if args.stage1_checkpoint is not None and not args.stage1_checkpoint.is_file():
        parser.error(f"--stage1-checkpoint {args.stage1_checkpoint} is not a file.")
    cfg = copy.deepcopy(PRESETS["quick" if args.quick else args.preset])
    for field, value in (
        ("stage1", args.stage1),
        ("stage1_steps", args.stage1_steps),
        ("stage1_images", args.stage1_images),
        ("steps", args.steps),
    ):
        if value is not None:
            setattr(cfg, field, value)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--preset gpu needs a CUDA device.")
    jobs = args.jobs or (1 if cfg.device == "cuda" else 2)
    seeds = args.seeds[:1] if args.quick else args.seeds
    methods = [] if args.stage1_only else args.methods
    paths = Paths(args.objects, args.backgrounds, args.stage1_objects)
    p_label = STAGE1_LABELS[
        "checkpoint" if args.stage1_checkpoint is not None else cfg.stage1
    ]
    if args.stage1_checkpoint is None and args.stage1_objects is not None:
        p_label = p_label.replace("object class", "stamp class of the object pool")
        p_label = p_label.replace("object-centric images", "object pool")
    start = time.perf_counter()
    results = run(paths, cfg, seeds, methods, jobs, args.stage1_checkpoint, args.out)
    seconds = time.perf_counter() - start
    verdict = gate(results)
    device = (
        torch.cuda.get_device_name() if cfg.device == "cuda" else f"{jobs} processes"
    )
    stage1 = (
        f"{cfg.stage1} {cfg.stage1_steps} steps"
        if args.stage1_checkpoint is None
        else f"loaded from {args.stage1_checkpoint}"
    )
    header = (
        f"Dense quality on copy-paste scenes, {len(seeds)} seed(s), stage 1 "
        f"{stage1}, stage 2 {cfg.steps} steps, "
        f"{cfg.arch} depth {cfg.depth} patch {cfg.patch_size}, {cfg.global_crop}px "
        f"crops, {seconds / 60:.1f} min ({device})"
    )
    text = "\n\n".join(
        part
        for part in (
            header,
            gate_text(verdict),
            table(results, methods, p_label),
            paired_differences(results, methods),
            diagnostics(results),
        )
        if part
    )
    print(text)
    figure = pca_figure(paths, cfg, seeds[0], args.out, p_label)
    if figure is not None:
        print(f"PCA figure: {figure}")
    write_text(args.out / "table.md", text + "\n")
    rows = ["R", "P", *methods]
    # Plain json.dumps: a NaN metric must not cost the run its results file.
    write_text(
        args.out / "results.json",
        json.dumps(
            {
                "config": asdict(cfg),
                "stage1": p_label,
                "stage1_checkpoint": None
                if args.stage1_checkpoint is None
                else str(args.stage1_checkpoint),
                "stage1_objects": None
                if args.stage1_objects is None
                else str(args.stage1_objects),
                "seeds": seeds,
                "gate": verdict,
                "rows": per_seed_scores(results, rows),
                "results": {str(seed): r for seed, r in results.items()},
                "seconds": seconds,
            },
            indent=2,
        ),
    )


if __name__ == "__main__":
    main()
