"""Report of the dense-quality benchmark: tables, gate verdict, diagnostics, PCA."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from dense_quality_config import (
    GATE,
    LABELS,
    METRIC_NAMES,
    METRICS,
    PCA_METHODS,
    Config,
    Paths,
)
from dense_quality_data import seed_data
from lightly.transforms.utils import IMAGENET_NORMALIZE
from seed_stats import format_mean_std

from lightly_cotap.eval import dense_feature_fn
from lightly_cotap.eval.visualize import pca_rgb, save_image_grid, to_uint8_images
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer


def per_seed_scores(
    results: dict[int, dict[str, Any]], rows: list[str]
) -> dict[str, dict[str, list[float]]]:
    """``{row: {metric: [per-seed mIoU in percent]}}``."""
    return {
        row: {
            metric: [100 * r[row]["scores"][metric] for r in results.values()]
            for metric in METRICS
        }
        for row in rows
    }


def gate(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """P's margins over the random initialisation and the verdict.

    Returns:
        ``margins`` ({metric: [per-seed points]}), ``mean_margins``, ``required``
        (:data:`GATE`), ``per_seed_passed`` and ``passed`` (mean margins >= GATE).
    """
    margins = {
        metric: [
            100 * (r["P"]["scores"][metric] - r["R"]["scores"][metric])
            for r in results.values()
        ]
        for metric in GATE
    }
    means = {metric: statistics.mean(v) for metric, v in margins.items()}
    per_seed = [
        all(margins[m][i] >= GATE[m] for m in GATE) for i in range(len(results))
    ]
    return {
        "margins": margins,
        "mean_margins": means,
        "required": dict(GATE),
        "per_seed_passed": dict(zip([str(s) for s in results], per_seed)),
        "passed": all(means[m] >= GATE[m] for m in GATE),
    }


def gate_text(verdict: dict[str, Any]) -> str:
    parts = [
        f"{METRIC_NAMES[m]} {verdict['mean_margins'][m]:+.1f} (needs +{GATE[m]:.0f}; "
        + "per seed "
        + ", ".join(f"{v:+.1f}" for v in verdict["margins"][m])
        + ")"
        for m in GATE
    ]
    sides = ", ".join(
        f"seed {seed} {'above' if ok else 'below'}"
        for seed, ok in verdict["per_seed_passed"].items()
    )
    status = "PASSED" if verdict["passed"] else "NOT PASSED"
    return (
        f"Gate (P minus random initialisation, mean over seeds): {status}: "
        + "; ".join(parts)
        + f". Per seed: {sides}. "
        + (
            "Stage 2 starts from an object-aware P."
            if verdict["passed"]
            else "Stage 2 starts below the gate: its rows do not test CoTAP's claim."
        )
    )


def table(results: dict[int, dict[str, Any]], methods: list[str], p_label: str) -> str:
    """Markdown table: mean +- std (over seeds) of the mIoU in percent."""
    labels = {**LABELS, "P": p_label}
    lines = [
        "| model | "
        + " | ".join(f"{METRIC_NAMES[m]} mIoU (%)" for m in METRICS)
        + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for method, scores in per_seed_scores(results, ["R", "P", *methods]).items():
        cells = []
        for metric in METRICS:
            cells.append(format_mean_std(scores[metric]))
        lines.append(f"| {labels[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(results: dict[int, dict[str, Any]], methods: list[str]) -> str:
    """Per-seed linear-probe differences of (b) against the other stage-2 runs."""
    if "b_cotap" not in methods:
        return ""
    lines = [
        "| linear probe, (b) minus | mean (pp) | per seed (pp) |",
        "|---|---:|---|",
    ]
    for other in [m for m in methods if m != "b_cotap"]:
        diffs = [
            100
            * (
                r["b_cotap"]["scores"]["linear_probe"]
                - r[other]["scores"]["linear_probe"]
            )
            for r in results.values()
        ]
        per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
        lines.append(
            f"| {LABELS[other]} | {statistics.mean(diffs):+.1f} | {per_seed} |"
        )
    return "\n".join(lines)


def diagnostics(results: dict[int, dict[str, Any]]) -> str:
    """Neighbour agreement with the scene layouts and CoTAP's final loss terms."""
    out = []
    agreement = [r["P"]["neighbors"] for r in results.values()]
    out.append(
        "P's CLS neighbours (positives of (b), (c)) share the background photo in "
        f"{100 * statistics.mean(a['neighbors_same_background'] for a in agreement):.0f}% "
        "of pairs (chance "
        f"{100 * statistics.mean(a['chance_same_background'] for a in agreement):.0f}%) "
        "and an object class in "
        f"{100 * statistics.mean(a['neighbors_shared_class'] for a in agreement):.0f}% "
        f"(chance {100 * statistics.mean(a['chance_shared_class'] for a in agreement):.0f}%)."
    )
    fg = [r["P"]["foreground_mask"] for r in results.values()]
    out.append(
        "P's CLS-attention foreground mask (the filter's mask in (b), (c)) on test "
        "scenes: precision "
        f"{100 * statistics.mean(f['precision'] for f in fg):.0f}% against an object "
        f"rate of {100 * statistics.mean(f['object_rate'] for f in fg):.0f}%, recall "
        f"{100 * statistics.mean(f['recall'] for f in fg):.0f}%."
    )
    for method in ("b_cotap", "c_cotap_no_rank", "b_cotap_label_pairs"):
        term_runs = [r[method]["loss_terms"] for r in results.values() if method in r]
        if not term_runs:
            continue
        names = sorted({name for terms in term_runs for name in terms})
        values = ", ".join(
            f"{name} {statistics.mean(t[name] for t in term_runs if name in t):.3f}"
            for name in names
        )
        out.append(f"{LABELS[method]}, loss terms over the last quarter: {values}.")
    return "\n".join(out)


@torch.no_grad()
def pca_figure(
    paths: Paths, cfg: Config, seed: int, out: Path, p_label: str, count: int = 4
) -> Path | None:
    """PCA-RGB of the dense features of P, (a) and (b) on ``count`` test scenes.

    One PCA per model, fitted jointly over the shown scenes; columns: input, P,
    (a), (b). Returns None when a model file is missing.
    """
    files = [out / "stage1" / f"seed{seed}.pth"] + [
        out / "models" / f"seed{seed}_{m}.pth" for m in PCA_METHODS
    ]
    if not all(f.is_file() for f in files):
        return None
    data = seed_data(paths.objects, paths.backgrounds, cfg, seed)
    images = torch.stack([image for image, _ in data.test[:count]])
    columns = [
        to_uint8_images(
            images, mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]
        )
    ]
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True)
        model = CoTAPVisionTransformer.from_checkpoint(state).eval()
        size = (images.shape[-2], images.shape[-1])
        columns.append(pca_rgb(dense_feature_fn(model)(images), size=size))
    titles = ["input", p_label.split(" (")[0], LABELS["a_dino"], LABELS["b_cotap"]]
    rows = [[column[i] for column in columns] for i in range(len(images))]
    path = out / "pca.png"
    save_image_grid(rows, path, cell_size=(128, 128))
    add_column_titles(path, titles, cell_width=128, padding=2)
    return path


def add_column_titles(
    path: Path, titles: list[str], cell_width: int, padding: int
) -> None:
    """Adds a white strip with one title per grid column on top of a PNG."""
    from PIL import Image, ImageDraw

    grid = Image.open(path).convert("RGB")
    canvas = Image.new("RGB", (grid.width, grid.height + 16), "white")
    canvas.paste(grid, (0, 16))
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        draw.text((padding + column * (cell_width + padding) + 2, 2), title, "black")
    canvas.save(path)
