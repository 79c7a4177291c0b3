"""Tasks of the noise-tolerance benchmark, their cache and the process pool.

A task trains and evaluates one student (learning-rate sweep or run) or scores the
untrained student of a seed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import statistics
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from noise_tolerance_data import (
    Paths,
    draw_batches,
    seed_data,
    teacher_features,
    teacher_stats,
)
from noise_tolerance_evaluate import evaluate, misleading_gradient_share
from noise_tolerance_settings import (
    CLEAN,
    LR_SOURCE,
    LRS,
    NUM_NEGATIVES,
    SWEEP_SEED,
    Config,
    Setting,
    all_settings,
    criterion_settings,
)
from noise_tolerance_train import Student, make_criterion, train_student
from tqdm import tqdm


def run_task(
    paths: Paths, cfg: Config, criterion: str, setting: Setting, seed: int, lr: float
) -> dict[str, Any]:
    """Trains and evaluates one student; returns its scores and diagnostics."""
    start, cpu_start = time.perf_counter(), time.process_time()
    data = seed_data(paths, cfg, seed)
    teacher = teacher_features(data.patch_labels, data.num_classes, setting.noise, seed)
    batches = draw_batches(data, cfg, setting.share, seed)
    stats = teacher_stats(data, teacher, batches, cfg, setting.share)
    list_size = (data.num_classes - 1) * cfg.top_k**2 * (1 + NUM_NEGATIVES)
    loss_fn = make_criterion(criterion, stats, list_size)
    torch.manual_seed(seed)
    student = Student()
    first = range(min(cfg.diagnostic_batches, cfg.steps))
    last = range(cfg.steps - len(first), cfg.steps)
    misleading_init = misleading_gradient_share(
        student, data, teacher, batches, loss_fn, first
    )
    losses = train_student(student, data, teacher, batches, loss_fn, cfg, lr)
    misleading_trained = misleading_gradient_share(
        student, data, teacher, batches, loss_fn, last
    )
    return {
        "scores": evaluate(student, data, cfg, seed),
        "teacher": asdict(stats),
        "misleading_init": misleading_init,
        "misleading_trained": misleading_trained,
        "loss_first": losses[0],
        "loss_last": statistics.mean(losses[-len(first) :]),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def init_task(paths: Paths, cfg: Config, seed: int) -> dict[str, float]:
    """Scores of the untrained student (the floor)."""
    torch.manual_seed(seed)
    return evaluate(Student(), seed_data(paths, cfg, seed), cfg, seed)


def _init_worker() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)


class TaskCache:
    """One JSON file per finished task: an interrupted run resumes where it stopped.

    The folder is specific to the configuration.
    """

    def __init__(self, folder: Path, cfg: Config) -> None:
        digest = hashlib.sha1(json.dumps(asdict(cfg)).encode()).hexdigest()[:10]
        self.folder = folder / digest
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, *key: Any) -> Path:
        name = "_".join(str(k) for k in key)
        return self.folder / (re.sub(r"[^A-Za-z0-9.=-]+", "-", name) + ".json")

    def load(self, *key: Any) -> Any:
        path = self.path(*key)
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, value: Any, *key: Any) -> None:
        self.path(*key).write_text(json.dumps(value))


def run(
    paths: Paths,
    cfg: Config,
    criteria: list[str],
    seeds: list[int],
    jobs: int,
    cache: TaskCache,
) -> dict[str, Any]:
    """The learning-rate sweep, then every (criterion, setting, seed) run.

    A criterion's runs are queued as soon as its sweep is done; tasks found in
    ``cache`` are not run again.
    """
    settings = all_settings()
    sweep = sorted({LR_SOURCE[c] for c in criteria})
    lr_scores: dict[str, dict[float, float]] = {c: {} for c in sweep}
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {
        c: {s.name: {} for s in criterion_settings(c, settings)} for c in criteria
    }
    init: dict[int, dict[str, float]] = {}
    best_lr: dict[str, float] = {}
    cpu_seconds = 0.0
    total = len(sweep) * len(LRS) + len(seeds) * (1 + sum(map(len, runs.values())))
    context = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker) as pool,
        tqdm(total=total, desc="noise tolerance", unit="run") as bar,
    ):
        pending: dict[Future[Any], tuple[Any, ...]] = {}

        def submit(key: tuple[Any, ...], fn: Any, *args: Any) -> None:
            cached = cache.load(*key)
            if cached is not None:
                done_now.append((key, cached))
            else:
                pending[pool.submit(fn, *args)] = key

        done_now: list[tuple[tuple[Any, ...], Any]] = []
        for c in sweep:
            for lr in LRS:
                submit(("sweep", c, lr), run_task, paths, cfg, c, CLEAN, SWEEP_SEED, lr)
        for seed in seeds:
            submit(("init", seed), init_task, paths, cfg, seed)
        while pending or done_now:
            if not done_now:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    key = pending.pop(future)
                    result = future.result()
                    cache.save(result, *key)
                    done_now.append((key, result))
            key, result = done_now.pop(0)
            bar.update()
            if key[0] != "init":
                cpu_seconds += result["cpu_seconds"]
            if key[0] == "init":
                init[key[1]] = result
            elif key[0] == "sweep":
                _, c, lr = key
                lr_scores[c][lr] = result["scores"]["linear_probe"]
                if len(lr_scores[c]) == len(LRS):
                    best_lr[c] = max(LRS, key=lambda v: lr_scores[c][v])
                    tqdm.write(f"{c}: lr {best_lr[c]:g} ({lr_scores[c]})")
                    for name in (n for n in criteria if LR_SOURCE[n] == c):
                        for seed in seeds:
                            for setting in criterion_settings(name, settings):
                                args = (name, setting, seed, best_lr[c])
                                submit(("run", *args), run_task, paths, cfg, *args)
            else:
                _, name, setting, seed, _ = key
                runs[name][setting.name][seed] = result
    return {
        "settings": settings,
        "lr": {c: best_lr[LR_SOURCE[c]] for c in criteria},
        "lr_sweep": lr_scores,
        "runs": runs,
        "init": init,
        "cpu_seconds": cpu_seconds,
    }
