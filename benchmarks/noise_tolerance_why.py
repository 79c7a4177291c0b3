"""Why ContinuousAPLoss and STEGO's loss behave as they do in noise_tolerance.py.

Two measurements on the benchmark's data, teacher, batches and student:

1. Where ContinuousAPLoss's gradient comes from (seed 0, no extra training beyond
   the benchmark's recipe): its weighted mean ``sum_i w_i l_i / sum_i w_i`` splits
   into the anchors that are same-class pairs and those that are different-class
   pairs. For each part: its share of the anchor weight, of the gradient mass on the
   scores (lists of the last 10 steps), and the share of that gradient that pushes
   pairs against their clean relation (the benchmark's "misleading" share), at the
   initial and at the trained student.
2. Two interventions, 3 seeds each, everything else as in the benchmark: CoTAPLoss's
   anchor-weight offset raised from -0.2 to 0.3 (different-class pairs, whose
   targets are about 0.1, stop being anchors unless noise lifts them above 0.3) at
   5 % and 50 % same-class pairs; and STEGO's loss without CoTAP's anchor weights
   (uniform weights, as in STEGO).

Usage::

    python benchmarks/noise_tolerance_why.py   # ~1.5 min of CPU time
"""

from __future__ import annotations

import argparse
import warnings

import torch
from copy_paste_inputs import add_input_arguments
from noise_tolerance_data import (
    Paths,
    draw_batches,
    pair_lists,
    seed_data,
    teacher_features,
    teacher_stats,
)
from noise_tolerance_evaluate import evaluate
from noise_tolerance_settings import Config
from noise_tolerance_train import (
    Student,
    make_criterion,
    student_features,
    train_student,
)
from seed_stats import mean_std
from torch import Tensor, nn

from lightly_cotap.loss import ContinuousAPLoss


class Unweighted(nn.Module):
    """Calls ``inner`` without the anchor weights CoTAPLoss passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        *,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        loss: Tensor = self.inner(scores=scores, targets=targets, mask=mask)
        return loss


def gradient_sources(paths: Paths, cfg: Config) -> str:
    """Table of measurement 1."""
    data = seed_data(paths, cfg, 0)
    criterion = ContinuousAPLoss()
    lines = [
        "| setting | student | anchor weight / gradient mass of different-class "
        "anchors | misleading in their gradient | misleading in same-class anchors' |",
        "|---|---|---:|---:|---:|",
    ]
    for noise, share in (("very heavy", "50%"), ("medium", "50%"), ("medium", "5%")):
        teacher = teacher_features(data.patch_labels, data.num_classes, noise, 0)
        batches = draw_batches(data, cfg, share, 0)
        for state in ("initial", "trained"):
            torch.manual_seed(0)
            student = Student()
            if state == "trained":
                train_student(student, data, teacher, batches, criterion, cfg, 1e-3)
            steps = range(cfg.steps - 10, cfg.steps)
            s, same, factor = pair_lists(
                data, student_features(student, data.train_images), batches, steps
            )
            t, _, _ = pair_lists(data, teacher, batches, steps)
            # [gradient mass, misleading mass, anchor weight] per anchor group
            sums = {"same": [0.0, 0.0, 0.0], "different": [0.0, 0.0, 0.0]}
            for row in range(s.shape[0]):
                weights = (t[row] + 0.2).clamp_min(0.0) * factor[row]
                for group, chosen in (("same", same[row]), ("different", ~same[row])):
                    part = weights * chosen
                    if not bool(part.sum() > 0):
                        continue
                    scores = s[row].clone().requires_grad_(True)
                    loss = criterion(scores=scores, targets=t[row], weights=part)
                    (grad,) = torch.autograd.grad(
                        loss * part.sum() / weights.sum(), scores
                    )
                    pull = -grad
                    misleading = pull[~same[row]].clamp_min(0).sum()
                    misleading += (-pull[same[row]]).clamp_min(0).sum()
                    sums[group][0] += float(grad.abs().sum())
                    sums[group][1] += float(misleading)
                    sums[group][2] += float(part.sum())
            diff, own = sums["different"], sums["same"]
            weight_share = diff[2] / (diff[2] + own[2])
            mass_share = diff[0] / (diff[0] + own[0])
            lines.append(
                f"| noise {noise}, {share} same-class | {state} | "
                f"{100 * weight_share:.0f}% / {100 * mass_share:.0f}% | "
                f"{100 * diff[1] / max(diff[0], 1e-12):.0f}% | "
                f"{100 * own[1] / max(own[0], 1e-12):.0f}% |"
            )
    return "\n".join(lines)


def interventions(paths: Paths, cfg: Config, seeds: list[int]) -> str:
    """Table of measurement 2 (linear-probe mIoU, mean +- std and per seed)."""

    def score(
        name: str,
        noise: str,
        share: str,
        lr: float,
        seed: int,
        offset: float,
        plain: bool,
    ) -> float:
        data = seed_data(paths, cfg, seed)
        teacher = teacher_features(data.patch_labels, data.num_classes, noise, seed)
        batches = draw_batches(data, cfg, share, seed)
        stats = teacher_stats(data, teacher, batches, cfg, share)
        list_size = (data.num_classes - 1) * cfg.top_k**2 * 2
        criterion = make_criterion(name, stats, list_size)
        if plain:
            criterion = Unweighted(criterion)
        torch.manual_seed(seed)
        student = Student()
        train_student(student, data, teacher, batches, criterion, cfg, lr, offset)
        return 100 * evaluate(student, data, cfg, seed)["linear_probe"]

    runs = [
        (
            "ContinuousAPLoss, anchor offset 0.3",
            "continuous_ap",
            "medium",
            "5%",
            1e-3,
            0.3,
            False,
        ),
        (
            "ContinuousAPLoss, anchor offset 0.3",
            "continuous_ap",
            "medium",
            "50%",
            1e-3,
            0.3,
            False,
        ),
        (
            "STEGO, calibrated shift, uniform weights",
            "stego",
            "none",
            "50%",
            1e-3,
            -0.2,
            True,
        ),
        (
            "STEGO, calibrated shift, uniform weights",
            "stego",
            "very heavy",
            "50%",
            1e-3,
            -0.2,
            True,
        ),
    ]
    lines = [
        "| run | setting | linear probe mIoU (%) | per seed |",
        "|---|---|---:|---|",
    ]
    for label, name, noise, share, lr, offset, plain in runs:
        values = [score(name, noise, share, lr, s, offset, plain) for s in seeds]
        mean, std = mean_std(values)
        per = ", ".join(f"{v:.1f}" for v in values)
        lines.append(
            f"| {label} | noise {noise}, {share} same-class | {mean:.1f} ± {std:.1f} | {per} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    paths, cfg = Paths(args.objects, args.backgrounds), Config()
    print(gradient_sources(paths, cfg), end="\n\n")
    print(interventions(paths, cfg, args.seeds))


if __name__ == "__main__":
    main()
