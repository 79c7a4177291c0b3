"""Tasks of the dense-quality benchmark and the process pool that runs them.

A task is stage 1 (-> P) or one stage-2 method of one seed.
"""

from __future__ import annotations

import multiprocessing
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from dense_quality_config import PCA_METHODS, Config, Paths
from dense_quality_data import SceneImages, object_centric_images, seed_data, transform
from dense_quality_evaluate import (
    build_neighbors,
    evaluate,
    foreground_agreement,
    neighbor_agreement,
)
from dense_quality_train import (
    backbone,
    train_cotap,
    train_densecl,
    train_dino,
    train_supervised,
)
from pytorch_lightning import seed_everything
from tqdm import tqdm

from lightly_cotap.atomic_write import save_torch
from lightly_cotap.data import NeighborIndex, SemanticPairDataset
from lightly_cotap.export import export_state_dict
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer


def stage1_task(
    paths: Paths, cfg: Config, seed: int, checkpoint: Path | None, out: Path
) -> tuple[dict[str, Any], NeighborIndex, dict[str, Any]]:
    """Stage 1 from random initialisation (or ``checkpoint``) -> P and its report.

    P is trained on object-centric images with ``cfg.stage1`` and saved to
    ``out/stage1/seed<seed>.pth`` (the format ``--stage1-checkpoint`` reads).

    Returns P, P's neighbour index (the positives of the CoTAP runs) and the report:
    the scores of the random initialisation and of P, and how P's neighbours and
    attention mask agree with the layouts.
    """
    start = time.perf_counter()
    data = seed_data(paths.objects, paths.backgrounds, cfg, seed)
    seed_everything(seed, verbose=False)
    model = backbone(cfg, use_filter=False).to(cfg.device)
    init_scores = evaluate(model.eval(), data, cfg, seed)
    if checkpoint is not None:
        p_state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = CoTAPVisionTransformer.from_checkpoint(p_state).to(cfg.device)
    else:
        if cfg.stage1 == "supervised":
            images, labels = object_centric_images(
                paths, cfg, seed, cfg.stage1_image_size
            )
            model = train_supervised(model, images, labels, cfg, seed)
        else:
            images, _ = object_centric_images(paths, cfg, seed, cfg.scene_size)
            model = train_dino(
                model, SceneImages(images), cfg, cfg.lr, seed, cfg.stage1_steps
            )
        p_state = export_state_dict(model)
        save_torch(p_state, out / "stage1" / f"seed{seed}.pth")
    model.eval()
    neighbors = build_neighbors(p_state, data.images, cfg)
    report = {
        "init_scores": init_scores,
        "scores": evaluate(model, data, cfg, seed),
        "neighbors": neighbor_agreement(neighbors, data.layouts),
        "foreground_mask": foreground_agreement(model, data.test, cfg.patch_size),
        "seconds": time.perf_counter() - start,
    }
    return p_state, neighbors, report


def stage2_task(
    paths: Paths,
    cfg: Config,
    seed: int,
    method: str,
    p_state: dict[str, Any],
    neighbors: NeighborIndex,
    out: Path,
    save_model: bool,
) -> dict[str, Any]:
    """Stage 2: continues from P with one of the methods, then evaluates.

    The scenes are rendered again here (a few seconds; deterministic in the seed)
    rather than sent to the worker process.
    """
    start = time.perf_counter()
    data = seed_data(paths.objects, paths.backgrounds, cfg, seed)
    lr = cfg.stage2_lr
    terms: dict[str, float] = {}
    if method in ("a_dino", "d_densecl"):
        train = train_dino if method == "a_dino" else train_densecl
        model = train(
            CoTAPVisionTransformer.from_checkpoint(p_state).to(cfg.device).train(),
            data.images,
            cfg,
            lr,
            seed,
            cfg.steps,
        )
    else:
        positives: dict[str, Any] = (
            {"labels": data.image_labels}
            if method == "b_cotap_label_pairs"
            else {"neighbors": neighbors}
        )
        pairs = SemanticPairDataset(
            data.images, transform=transform(cfg), seed=seed, **positives
        )
        weight = 0.0 if method == "c_cotap_no_rank" else 1.0
        model, terms = train_cotap(
            p_state,
            pairs,
            cfg,
            lr,
            seed,
            cotap_weight=weight,
            use_filter=method != "e_cotap_no_filter",
        )
    if save_model and method in PCA_METHODS:
        save_torch(
            export_state_dict(model), out / "models" / f"seed{seed}_{method}.pth"
        )
    return {
        "scores": evaluate(model, data, cfg, seed),
        "loss_terms": terms,
        "seconds": time.perf_counter() - start,
    }


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)


def run(
    paths: Paths,
    cfg: Config,
    seeds: list[int],
    methods: list[str],
    jobs: int,
    checkpoint: Path | None,
    out: Path,
) -> dict[int, dict[str, Any]]:
    """Runs every (seed, stage) task on ``jobs`` single-threaded worker processes.

    A seed's stage-2 tasks are queued as soon as its checkpoint P exists, so the
    workers stay busy. Returns ``{seed: {"P": report, method: report, ...}}``.
    """
    results: dict[int, dict[str, Any]] = {seed: {} for seed in seeds}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(1,)
    ) as pool:
        pending: dict[Future[Any], tuple[int, str]] = {
            pool.submit(stage1_task, paths, cfg, seed, checkpoint, out): (seed, "P")
            for seed in seeds
        }
        total = len(seeds) * (1 + len(methods))
        with tqdm(total=total, desc="dense quality", unit="run") as bar:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    seed, method = pending.pop(future)
                    if method == "P":
                        p_state, neighbors, report = future.result()
                        results[seed]["R"] = {"scores": report["init_scores"]}
                        # CoTAP runs first: the slowest tasks should not be last.
                        for name in sorted(methods, key=lambda m: "cotap" not in m):
                            task = pool.submit(
                                stage2_task,
                                paths,
                                cfg,
                                seed,
                                name,
                                p_state,
                                neighbors,
                                out,
                                seed == seeds[0],
                            )
                            pending[task] = (seed, name)
                    else:
                        report = future.result()
                    results[seed][method] = report
                    bar.update()
                    tqdm.write(
                        f"[seed {seed}] {method}: "
                        + ", ".join(
                            f"{k} {100 * v:.1f}" for k, v in report["scores"].items()
                        )
                        + f" ({report['seconds']:.0f}s)"
                    )
    return results
