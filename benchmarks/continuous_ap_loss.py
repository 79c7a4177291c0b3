"""Speed and memory of ContinuousAPLoss: sort-based fast path vs. the dense reference.

Prints a Markdown table with forward+backward time and peak memory above the
process baseline for list sizes n, and the dense / fast ratios, all measured in
this one process. The dense path is skipped where its pair matrices would not
fit (its memory is estimated instead).

Usage:
    python benchmarks/continuous_ap_loss.py [--sizes 1000 4200 16000 65536 262144]
        [--device cpu|cuda] [--repeats 3] [--dense-max 16000] [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lightly_cotap.loss import ContinuousAPLoss

DENSE_BYTES_PER_PAIR = 4 * 8  # ~8 float32 (n, n) tensors alive in forward+backward


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 4200, 16000, 65536, 262144]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dense-max", type=int, default=16000, help="largest n run on the dense path"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = default)"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fast = ContinuousAPLoss(method="fast")
    dense = ContinuousAPLoss(method="dense")
    measure(fast, 512, device, 1)  # warm-up
    measure(dense, 512, device, 1)

    mib = 2.0**20
    print(
        f"device={device}, torch threads={torch.get_num_threads()}, "
        f"repeats={args.repeats} (best of), forward+backward of the whole loss\n"
    )
    print(
        "| n | fast time (s) | dense time (s) | speed-up dense/fast "
        "| fast peak (MiB) | dense peak (MiB) | memory dense/fast |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        t_fast, m_fast = measure(fast, n, device, args.repeats)
        if n <= args.dense_max:
            t_dense, m_dense = measure(dense, n, device, args.repeats)
            dense_cols = (
                f"{t_dense:.3f} | {t_dense / t_fast:.1f}x | {m_fast / mib:.1f} | "
                f"{m_dense / mib:.1f} | {m_dense / max(m_fast, 1):.0f}x"
            )
        else:
            estimate = n * n * DENSE_BYTES_PER_PAIR / 2.0**30
            dense_cols = (
                f"skipped (~{estimate:.0f} GiB) | - | {m_fast / mib:.1f} | "
                f"~{estimate * 1024:.0f} (est.) | -"
            )
        print(f"| {n} | {t_fast:.3f} | {dense_cols} |", flush=True)


if __name__ == "__main__":
    main()
