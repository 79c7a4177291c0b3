"""Cost of the CoTAP object-aware filter: forward+backward time and peak memory.

Compares CoTAPVisionTransformer with and without the filter (same timm ViT, same
input) and prints a Markdown table with the ratios filter / no filter, all measured
on this machine. Target: the filter adds at most 15% time.

- Time: median over ``--repeats`` forward+backward steps (after a warm-up step),
  the two configurations interleaved in one process so that background load hits
  both alike.
- Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the memory held
  before the step; on CPU the peak resident set size (``ru_maxrss``) of a fresh
  subprocess per configuration minus its resident set size just before the step
  (coarse: allocator caching shows up in it).
- Saved activations: the bytes of the distinct tensors autograd keeps for backward
  (``saved_tensors_hooks``, parameters excluded), exact and allocator independent.

Usage:
    python benchmarks/cotap_vit.py [--arch vit_small_patch16_224] [--img-size 224]
        [--batch-size 8] [--repeats 5] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from lightly_cotap.models import CoTAPVisionTransformer


def _build(arch: str, use_filter: bool, img_size: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CoTAPVisionTransformer(arch, use_filter=use_filter, img_size=img_size)
    return model.to(device).train()


def _step(model: torch.nn.Module, images: torch.Tensor) -> None:
    out = model(images)
    loss = out.cls.square().mean() + out.dense.square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _saved_activation_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward (parameters excluded).

    This is the activation memory held at the end of the forward pass, the main part
    of the peak of a training step, measured exactly and independent of the
    allocator.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images)
        loss = out.cls.square().mean() + out.dense.square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_worker(args: argparse.Namespace, use_filter: bool) -> int:
    """Peak memory (bytes) of one forward+backward step above the state before it."""
    model = _build(args.arch, use_filter, args.img_size, args.device)
    images = torch.randn(
        args.batch_size, 3, args.img_size, args.img_size, device=args.device
    )
    if args.device == "cuda":
        _step(model, images)  # warm-up (cuDNN / allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(model, images)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    before = _rss_bytes()
    _step(model, images)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(peak - before)


def _measure_memory(args: argparse.Namespace, use_filter: bool) -> int:
    """Runs the memory measurement in a fresh subprocess."""
    cmd = [
        sys.executable,
        __file__,
        "--arch",
        args.arch,
        "--img-size",
        str(args.img_size),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--memory-worker",
        "filter" if use_filter else "plain",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def _measure_time(args: argparse.Namespace) -> dict[bool, list[float]]:
    models = {
        flag: _build(args.arch, flag, args.img_size, args.device)
        for flag in (False, True)
    }
    images = torch.randn(
        args.batch_size, 3, args.img_size, args.img_size, device=args.device
    )
    for model in models.values():  # warm-up
        _step(model, images)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for flag, model in models.items():
            _sync(args.device)
            start = time.perf_counter()
            _step(model, images)
            _sync(args.device)
            times[flag].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--memory-worker", choices=["filter", "plain"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_worker is not None:
        peak = _memory_worker(args, use_filter=args.memory_worker == "filter")
        print(json.dumps({"peak_bytes": peak}))
        return

    times = _measure_time(args)
    memory = {flag: _measure_memory(args, flag) for flag in (False, True)}
    images = torch.randn(
        args.batch_size, 3, args.img_size, args.img_size, device=args.device
    )
    saved = {
        flag: _saved_activation_bytes(
            _build(args.arch, flag, args.img_size, args.device), images
        )
        for flag in (False, True)
    }
    median = {flag: statistics.median(values) for flag, values in times.items()}
    mib = 2.0**20
    print(
        f"CoTAPVisionTransformer forward+backward: {args.arch}, "
        f"{args.img_size} px, batch {args.batch_size}, device {args.device}, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print()
    print(
        "| configuration | time / step (s) | peak memory of the step (MiB) "
        "| saved activations (MiB) |"
    )
    print("| --- | ---: | ---: | ---: |")
    for flag, name in ((False, "without filter (D)"), (True, "with filter (2D)")):
        print(
            f"| {name} | {median[flag]:.3f} | {memory[flag] / mib:.0f} "
            f"| {saved[flag] / mib:.1f} |"
        )
    print(
        f"| **ratio filter / no filter** | **{median[True] / median[False]:.3f}** "
        f"| **{memory[True] / memory[False]:.3f}** "
        f"| **{saved[True] / saved[False]:.3f}** |"
    )
    print()
    spread = {
        flag: f"{min(values):.3f}-{max(values):.3f}" for flag, values in times.items()
    }
    print(f"time range (s): without {spread[False]}, with {spread[True]}")
    overhead = median[True] / median[False] - 1.0
    verdict = "meets" if overhead <= 0.15 else "MISSES"
    print(f"filter time overhead: {100 * overhead:.1f}% ({verdict} the <= 15% target)")


if __name__ == "__main__":
    main()
