"""Device check: the GPU numbers of lightly-cotap in one command (<= 8 min, one GPU).

Sections, in this order (each guarded: a failure is reported with its reason and
the others still run; a section that would overrun ``--budget-s`` is skipped):

- ``sync``: one CoTAP training step (EMA update, forwards under autocast,
  objective, backward) and the loss's sort-based path under
  :func:`lightly_cotap.train.host_sync.forbid_host_sync`, which on a GPU also sets
  ``torch.cuda.set_sync_debug_mode("error")``.
- ``loss``: ``ContinuousAPLoss`` dense vs. sort-based vs. automatic path at n = 1k
  ... 256k (forward+backward time, peak memory), the measured crossover and the
  automatic path's time over the better one (target <= 1.10).
- ``step``: the CoTAP training step, ViT-S/16 at 224 px (96 px local crops), bf16
  autocast: the largest batch that fits (doubling, then bisection), images/s and
  peak memory of the full objective vs. a DINO-style CLS-only step at that batch,
  and their ratio (target <= 1.3).
- ``filter``: the object-aware filter's overhead (ViT-S/16 forward+backward with
  vs. without it, time and memory).
- ``mmseg``: FCN on ViT-S/16 at 512 px through the plugin's mmseg backbone
  (``mmseg_configs/fcn``), training iterations/s and peak memory.
- ``compile``: the CoTAP step with ``CoTAPModule.compile_networks()`` vs. eager
  (compile time, images/s).

Prints progress, then one table; ``--out`` also writes every number as JSON. On a
machine without CUDA (or with ``--cpu-smoke``) it runs tiny sizes on the CPU to
check that every section works.

The script runs the sections and prints the table; ``device_check_sizes`` (sizes
and targets), ``device_check_runner`` (time budget, guarded sections),
``device_check_sections`` (the measurements) and ``device_check_report`` (the table)
hold the work.

Usage:
    python benchmarks/device_check.py --out device_check.json
    python benchmarks/device_check.py --cpu-smoke --out smoke.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The tests load this file by path: its folder must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_check_report import table  # noqa: E402
from device_check_runner import Budget, log, run_section  # noqa: E402
from device_check_sections import (  # noqa: E402
    check_compile,
    check_filter,
    check_loss,
    check_mmseg,
    check_step,
    check_sync,
)
from device_check_sizes import SIZES  # noqa: E402


def _compile_batch(step: dict[str, Any], sizes: dict[str, Any]) -> int:
    """Half the largest batch the step section found (compiled graphs may need more
    memory), else the sync section's batch.
    """
    if "batch_pairs" in step:
        return max(1, int(step["batch_pairs"]) // 2)
    return int(sizes["sync_batch"])


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return f"CPU ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON output file.")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="Tiny sizes on the CPU (automatic without CUDA).",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["sync", "loss", "step", "filter", "mmseg", "compile"],
        help="Sections to run (in the fixed order).",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of the compile section (default: inductor; "
        "eager with --cpu-smoke, where inductor takes minutes: it then checks the "
        "graph capture only).",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="Time budget of the whole run; sections that would overrun it are "
        "skipped (the compile section needs 150 s of it).",
    )
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    sizes = SIZES["cpu" if smoke else "gpu"]
    backend = args.compile_backend or ("eager" if smoke else "inductor")
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {
        "hardware": _hardware(device),
        "torch": torch.__version__,
        "mode": "cpu-smoke" if smoke else "gpu",
        "sections": {},
    }
    log(f"device check on {report['hardware']} (torch {torch.__version__})")
    sections = report["sections"]
    plan: list[tuple[str, Callable[[], dict[str, Any]], float]] = [
        ("sync", lambda: check_sync(sizes, device), 20),
        ("loss", lambda: check_loss(sizes, device), 30),
        ("step", lambda: check_step(sizes, device, budget), 90),
        ("filter", lambda: check_filter(sizes, device), 20),
        ("mmseg", lambda: check_mmseg(sizes, device), 30),
        (
            "compile",
            lambda: check_compile(
                sizes,
                device,
                _compile_batch(sections.get("step", {}), sizes),
                backend,
            ),
            150,
        ),
    ]
    for name, fn, needs_s in plan:
        if name in args.sections:
            sections[name] = run_section(name, fn, budget, 0 if smoke else needs_s)
            if args.out is not None:  # after every section: kept if cut short
                args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nDevice check: {report['hardware']}, torch {report['torch']}\n")
    print(table(report))
    return report


if __name__ == "__main__":
    statuses = [s["status"] for s in main()["sections"].values()]
    sys.exit(1 if any(s.startswith("failed") for s in statuses) else 0)
