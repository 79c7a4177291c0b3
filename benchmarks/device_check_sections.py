"""The measurements of the device check, one function per section."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from continuous_ap_loss import crossover, sweep
from device_check_runner import Budget, log
from device_check_sizes import AUTO_TARGET, FCN_CONFIG, STEP_TARGET, TINY_VIT
from train_step import (
    adamw,
    build_module,
    fake_views,
    step_losses,
    train_steps,
)

from lightly_cotap.loss import ContinuousAPLoss
from lightly_cotap.loss._ranking_ops import fast_negatives_and_positives
from lightly_cotap.models import CoTAPVisionTransformer
from lightly_cotap.train.host_sync import forbid_host_sync
from lightly_cotap.transforms import CoTAPTransform


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        "out of memory" in str(error).lower()
    )


# -- sections -------------------------------------------------------------------


def _batch(preset: dict[str, Any], batch_size: int, device: torch.device) -> Any:
    transform = CoTAPTransform(
        global_crop_size=preset["global_crop_size"],
        local_crop_size=preset["local_crop_size"],
        n_local_views=preset["n_local_views"],
    )
    return tuple(fake_views(transform, batch_size, device) for _ in range(2))


def check_sync(sizes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    preset = dict(sizes["step_preset"], batch_size=sizes["sync_batch"])
    torch.manual_seed(0)
    module = build_module(preset, full=True).to(device).train()
    optimizer = adamw(module)
    batch = _batch(preset, preset["batch_size"], device)
    # Warm-up until the prototypes are initialised (k-means runs once per run and
    # reads values on purpose), so the checked step has every term.
    for _ in range(64):
        if module.backbone.prototypes_initialized:
            break
        train_steps(module, optimizer, batch, 1, sizes["dtype"])
    else:
        raise RuntimeError("the prototypes were not initialised in 64 steps")
    with forbid_host_sync():
        step_losses(module, batch, sizes["dtype"])
    _sync(device)
    n = sizes["sync_fast_n"]
    scores = torch.randn(n, device=device, requires_grad=True)
    targets = torch.rand(n, device=device)
    with forbid_host_sync():
        if device.type == "cuda":
            ContinuousAPLoss(method="fast")(scores=scores, targets=targets).backward()
        else:
            # The loss's CPU path counts the distinct targets (a free read there);
            # check the path it takes on a GPU, with the levels bounded by n.
            rows = torch.zeros(n, dtype=torch.long)
            neg, _ = fast_negatives_and_positives(
                scores, targets, rows, 0.5, row_length=n
            )
            neg.sum().backward()
    _sync(device)
    return {
        "training_step": "no host synchronisation",
        "prototypes_initialized": module.backbone.prototypes_initialized,
        "fast_loss_n": n,
        "sync_debug_mode": device.type == "cuda",
    }


def check_loss(sizes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        dense_max = torch.cuda.mem_get_info(device)[0] / 2
    else:
        dense_max = 2.0**30
    rows = sweep(sizes["loss_sizes"], device, sizes["loss_repeats"], dense_max)
    worst = max(rows, key=lambda row: row["auto_vs_best"])
    return {
        "rows": rows,
        "crossover_n": crossover(rows),
        "auto_vs_best_max": round(worst["auto_vs_best"], 3),
        "auto_vs_best_max_at_n": worst["n"],
        "status": "ok"
        if worst["auto_vs_best"] <= AUTO_TARGET
        else f"ok, auto path misses the {AUTO_TARGET} target at n={worst['n']}",
    }


def _fits(
    module: Any,
    optimizer: torch.optim.Optimizer,
    preset: dict[str, Any],
    batch_size: int,
    sizes: Any,
) -> bool:
    device = next(module.parameters()).device
    try:
        batch = _batch(preset, batch_size, device)
        train_steps(module, optimizer, batch, 2, sizes["dtype"])
        return True
    except RuntimeError as error:
        if not _is_oom(error):
            raise
        module.zero_grad(set_to_none=True)
        return False
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(
    module: Any,
    optimizer: torch.optim.Optimizer,
    preset: dict[str, Any],
    sizes: dict[str, Any],
    budget: Budget,
) -> int:
    """Largest batch (pairs) whose step fits: doubling, then two bisections."""
    fit, fail = 0, None
    batch_size = sizes["batch_start"]
    while batch_size <= sizes["batch_max"] and budget.left() > 120:
        if not _fits(module, optimizer, preset, batch_size, sizes):
            fail = batch_size
            break
        fit, batch_size = batch_size, batch_size * 2
        log(f"  batch {fit} fits")
    if fit == 0:
        raise RuntimeError(f"batch {sizes['batch_start']} does not fit")
    for _ in range(2):
        if fail is None or fail - fit <= max(1, fit // 8) or budget.left() < 120:
            break
        middle = (fit + fail) // 2
        if _fits(module, optimizer, preset, middle, sizes):
            fit = middle
            log(f"  batch {fit} fits")
        else:
            fail = middle
    return fit


def check_step(
    sizes: dict[str, Any], device: torch.device, budget: Budget
) -> dict[str, Any]:
    preset = sizes["step_preset"]
    torch.manual_seed(0)
    modules = {
        "cotap": build_module(preset, full=True).to(device).train(),
        "dino_cls": build_module(preset, full=False).to(device).train(),
    }
    optimizers = {name: adamw(module) for name, module in modules.items()}
    batch_size = largest_batch(
        modules["cotap"], optimizers["cotap"], preset, sizes, budget
    )
    batch = _batch(preset, batch_size, device)
    times: dict[str, list[float]] = {name: [] for name in modules}
    peak: dict[str, float | None] = {}
    dtype = sizes["dtype"]
    for name, module in modules.items():
        train_steps(module, optimizers[name], batch, 2, dtype)  # warm-up
        _reset_peak(device)
        times[name] += train_steps(module, optimizers[name], batch, 1, dtype)
        peak[name] = _peak_gib(device)
    for _ in range(sizes["timed_steps"]):  # interleaved against drift
        for name, module in modules.items():
            times[name] += train_steps(module, optimizers[name], batch, 1, dtype)
    median = {name: statistics.median(t) for name, t in times.items()}
    images = 2 * batch_size  # x and its neighbour x+ per pair
    ratio = median["cotap"] / median["dino_cls"]
    return {
        "batch_pairs": batch_size,
        "images_per_step": images,
        "crops": f"{preset['global_crop_size']}/{preset['local_crop_size']} px x "
        f"(2 + {preset['n_local_views']})",
        "seconds_per_step": {k: round(v, 4) for k, v in median.items()},
        "images_per_s": {k: round(images / v, 1) for k, v in median.items()},
        "peak_gib": peak,
        "ratio_cotap_to_dino": round(ratio, 3),
        "status": "ok"
        if ratio <= STEP_TARGET
        else f"ok, ratio misses the {STEP_TARGET} target",
    }


def check_filter(sizes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    cfg = sizes["filter"]
    images = torch.randn(cfg["batch"], 3, cfg["img_size"], cfg["img_size"]).to(device)
    result: dict[str, dict[str, Any]] = {}
    models = {}
    for use_filter in (False, True):
        torch.manual_seed(0)
        models[use_filter] = CoTAPVisionTransformer(
            cfg["arch"],
            use_filter=use_filter,
            img_size=cfg["img_size"],
            **cfg.get("timm", {}),
        ).to(device)

    def step(model: torch.nn.Module) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=sizes["dtype"]):
            out = model(images)
            loss = out.cls.float().square().mean() + out.dense.float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    for use_filter, model in models.items():
        step(model)  # warm-up
        _reset_peak(device)
        times[use_filter].append(step(model))
        result["with" if use_filter else "without"] = {"peak_gib": _peak_gib(device)}
    for _ in range(4 if device.type == "cuda" else 1):
        for use_filter, model in models.items():
            times[use_filter].append(step(model))
    median = {flag: statistics.median(t) for flag, t in times.items()}
    for flag, key in ((False, "without"), (True, "with")):
        result[key]["seconds"] = round(median[flag], 4)
    peaks = result["with"]["peak_gib"], result["without"]["peak_gib"]
    return {
        **result,
        "batch": cfg["batch"],
        "img_size": cfg["img_size"],
        "time_ratio": round(median[True] / median[False], 3),
        "memory_ratio": None if None in peaks else round(peaks[0] / peaks[1], 3),
    }


def check_mmseg(sizes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    try:
        # First: installs the mmcv stand-ins, registers CoTAPViT.
        import lightly_cotap.mmseg  # noqa: F401
    except ImportError as error:
        return {"status": f"skipped: mmseg not installed ({error})"}
    from mmengine.config import Config
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg_sizes = sizes["mmseg"]
    size = cfg_sizes["img_size"]
    cfg = Config.fromfile(str(FCN_CONFIG))
    model_cfg = cfg.model
    model_cfg.backbone.init_cfg = None  # random weights: speed only
    model_cfg.data_preprocessor.size = (size, size)
    for head in (model_cfg.decode_head, model_cfg.auxiliary_head):
        head.norm_cfg = dict(type="BN", requires_grad=True)  # one process
    if device.type == "cpu":
        model_cfg.backbone.update(
            arch="vit_tiny_patch16_224",
            img_size=(size, size),
            out_indices=(0, 1),
            timm_kwargs=TINY_VIT,
            num_prototypes=4,
        )
        width = TINY_VIT["embed_dim"]
        model_cfg.decode_head.update(in_channels=2 * width, channels=16)  # filter: 2D
        model_cfg.auxiliary_head.update(in_channels=width, channels=16)
    else:
        model_cfg.backbone.img_size = (size, size)
    model = MODELS.build(model_cfg)  # random weights: init_weights is not needed
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-5
    )
    gen = torch.Generator().manual_seed(0)
    num_classes = model_cfg.decode_head.num_classes

    def sample() -> Any:
        labels = torch.randint(0, num_classes, (1, size, size), generator=gen)
        data_sample = SegDataSample()
        data_sample.gt_sem_seg = PixelData(data=labels)
        data_sample.set_metainfo({"img_shape": (size, size), "ori_shape": (size, size)})
        return data_sample

    data = {
        "inputs": [
            torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8)
            for _ in range(cfg_sizes["batch"])
        ],
        "data_samples": [sample() for _ in range(cfg_sizes["batch"])],
    }

    def iteration() -> float:
        _sync(device)
        start = time.perf_counter()
        batch = model.data_preprocessor(copy.copy(data), True)
        with torch.autocast(device.type, dtype=sizes["dtype"]):
            losses = model(**batch, mode="loss")
        loss, _ = model.parse_losses(losses)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    for _ in range(2):
        iteration()
    _reset_peak(device)
    times = [iteration() for _ in range(cfg_sizes["iters"])]
    median = statistics.median(times)
    return {
        "config": FCN_CONFIG.name,
        "img_size": size,
        "batch": cfg_sizes["batch"],
        "iterations_per_s": round(1.0 / median, 3),
        "peak_gib": _peak_gib(device),
    }


def check_compile(
    sizes: dict[str, Any], device: torch.device, batch_size: int, backend: str
) -> dict[str, Any]:
    preset = sizes["step_preset"]
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    modules = {"eager": build_module(preset, full=True).to(device).train()}
    modules["compiled"] = copy.deepcopy(modules["eager"])
    modules["compiled"].compile_networks(backend=backend)
    optimizers = {name: adamw(module) for name, module in modules.items()}
    batch = _batch(preset, batch_size, device)
    dtype = sizes["dtype"]
    start = time.monotonic()
    train_steps(
        modules["compiled"], optimizers["compiled"], batch, 2, dtype
    )  # compiles
    compile_s = time.monotonic() - start
    train_steps(modules["eager"], optimizers["eager"], batch, 2, dtype)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(sizes["timed_steps"]):
        for name, module in modules.items():
            times[name] += train_steps(module, optimizers[name], batch, 1, dtype)
    median = {k: statistics.median(v) for k, v in times.items()}
    images = 2 * batch_size
    breaks = torch._dynamo.utils.counters["graph_break"]
    return {
        "backend": backend,
        "batch_pairs": batch_size,
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": [reason[:200] for reason, _ in breaks.most_common(3)],
        "compile_and_first_steps_s": round(compile_s, 1),
        "images_per_s": {k: round(images / v, 1) for k, v in median.items()},
        "speedup": round(median["eager"] / median["compiled"], 3),
    }
