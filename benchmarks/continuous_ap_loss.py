"""Speed and memory of ContinuousAPLoss: sort-based fast path vs. the dense reference.

Prints a Markdown table with forward+backward time and peak memory above the
process baseline for list sizes n, the dense / fast ratios, the path the automatic
choice takes and its time over the better of the two, all measured in this one
process on the given device (CUDA when available), and the measured crossover.
The dense path is skipped where its pair matrices would not fit (its memory is
estimated instead).

Usage:
    python benchmarks/continuous_ap_loss.py [--sizes 1000 4200 16000 65536 262144]
        [--device cpu|cuda] [--repeats 3] [--dense-max-gib 8] [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightly_cotap.loss import ContinuousAPLoss
from lightly_cotap.loss.continuous_ap_loss import (
    DENSE_TENSORS_PER_PAIR,
    default_dense_max_pairs,
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use_bytes() -> int:
    """Bytes currently allocated through malloc (glibc), else the resident set size."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)
    except (OSError, AttributeError):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int]]:
    """Yields a one-element list that receives the peak bytes above the baseline."""
    result = [0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result[0] = torch.cuda.max_memory_allocated() - base
        return
    gc.collect()
    base = _heap_in_use_bytes()
    peak = [base]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _heap_in_use_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result[0] = max(peak[0], _heap_in_use_bytes()) - base


def measure(
    loss_fn: Callable[..., torch.Tensor],
    n: int,
    device: torch.device,
    repeats: int,
) -> tuple[float, int]:
    """Best forward+backward time (s) and peak memory (bytes) over ``repeats`` runs."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(n, generator=gen).tanh().to(device)
    targets = torch.randn(n, generator=gen).tanh().to(device)
    best_time, best_mem = float("inf"), 0
    for _ in range(repeats):
        s = scores.clone().requires_grad_(True)
        with peak_memory(device) as mem:
            start = time.perf_counter()
            loss = loss_fn(scores=s, targets=targets)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        del loss, s
        best_time = min(best_time, elapsed)
        best_mem = mem[0] if best_mem == 0 else min(best_mem, mem[0])
    return best_time, best_mem


def dense_bytes(n: int) -> int:
    """Estimated peak bytes of the dense path (float32, one list of n)."""
    return n * n * DENSE_TENSORS_PER_PAIR * 4


def sweep(
    sizes: list[int], device: torch.device, repeats: int, dense_max_bytes: float
) -> list[dict[str, Any]]:
    """Times dense, fast and automatic paths at every n (forward+backward).

    The dense path is skipped where its estimated memory exceeds
    ``dense_max_bytes``. Returns one row per n: ``n``, ``{dense,fast,auto}_s``,
    ``{dense,fast,auto}_bytes`` (None where skipped), ``auto_path`` and
    ``auto_vs_best`` (automatic time over the better of the two measured).
    """
    losses = {name: ContinuousAPLoss(method=name) for name in ("dense", "fast", "auto")}
    for name in ("dense", "fast"):  # warm-up (kernels, allocator)
        measure(losses[name], 512, device, 1)
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"n": n}
        for name, loss_fn in losses.items():
            if name == "dense" and dense_bytes(n) > dense_max_bytes:
                row["dense_s"] = row["dense_bytes"] = None
                continue
            row[f"{name}_s"], row[f"{name}_bytes"] = measure(
                loss_fn, n, device, repeats
            )
        probe = torch.zeros(n, device=device)
        row["auto_path"] = "dense" if losses["auto"].uses_dense(probe) else "fast"
        best = min(t for t in (row["dense_s"], row["fast_s"]) if t is not None)
        row["auto_vs_best"] = row["auto_s"] / best
        rows.append(row)
    return rows


def crossover(rows: list[dict[str, Any]]) -> str:
    """The measured n range where the fast path starts to beat the dense one."""
    previous = None
    for row in rows:
        if row["dense_s"] is None:
            break
        if row["fast_s"] < row["dense_s"]:
            return f"{previous}..{row['n']}" if previous else f"<= {row['n']}"
        previous = row["n"]
    return f"> {previous}" if previous else "not measured"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 4200, 16000, 65536, 262144]
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dense-max-gib",
        type=float,
        default=None,
        help="largest estimated dense memory run (default: 8 GiB on CPU, half the "
        "free memory on CUDA)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = default)"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.dense_max_gib is not None:
        dense_max = args.dense_max_gib * 2.0**30
    elif device.type == "cuda":
        dense_max = torch.cuda.mem_get_info(device)[0] / 2
    else:
        dense_max = 8 * 2.0**30
    rows = sweep(args.sizes, device, args.repeats, dense_max)

    mib = 2.0**20
    print(
        f"device={device}, torch threads={torch.get_num_threads()}, "
        f"repeats={args.repeats} (best of), forward+backward of the whole loss\n"
    )
    print(
        "| n | fast time (s) | dense time (s) | speed-up dense/fast "
        "| fast peak (MiB) | dense peak (MiB) | memory dense/fast "
        "| auto path | auto / best |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        t_fast, m_fast = row["fast_s"], row["fast_bytes"]
        if row["dense_s"] is not None:
            t_dense, m_dense = row["dense_s"], row["dense_bytes"]
            dense_cols = (
                f"{t_dense:.3f} | {t_dense / t_fast:.1f}x | {m_fast / mib:.1f} | "
                f"{m_dense / mib:.1f} | {m_dense / max(m_fast, 1):.0f}x"
            )
        else:
            estimate = dense_bytes(row["n"]) / 2.0**30
            dense_cols = (
                f"skipped (~{estimate:.0f} GiB) | - | {m_fast / mib:.1f} | "
                f"~{estimate * 1024:.0f} (est.) | -"
            )
        print(
            f"| {row['n']} | {t_fast:.3f} | {dense_cols} | {row['auto_path']} "
            f"| {row['auto_vs_best']:.2f} |",
            flush=True,
        )
    limit = default_dense_max_pairs(device, torch.float32)
    print(
        f"\nfast path faster than dense from n in {crossover(rows)}; the automatic "
        f"choice on {device.type} takes the dense path up to n = {math.isqrt(limit)} "
        f"(B * n * n <= {limit})"
    )


if __name__ == "__main__":
    main()
