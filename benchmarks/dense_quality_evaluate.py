"""Evaluation of the dense-quality benchmark.

Dense mIoU of a model (linear probe, k-means, retrieval, object / background probe)
and how P's neighbours and foreground mask agree with the scene layouts.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from dense_quality_config import METRICS, Config
from dense_quality_data import SceneImages, SeedData
from torch import Tensor

from lightly_cotap.data import NeighborIndex
from lightly_cotap.eval import dense_feature_fn, evaluate_dense
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer


def build_neighbors(
    p_state: dict[str, Any], images: SceneImages, cfg: Config
) -> NeighborIndex:
    """kNN positives from P's CLS embeddings of the (center-resized) scenes."""
    from lightly_cotap.data.segmentation_folder import image_to_tensor

    model = CoTAPVisionTransformer.from_checkpoint(p_state).to(cfg.device).eval()
    with torch.no_grad():
        x = torch.stack(
            [
                image_to_tensor(im.resize((cfg.global_crop, cfg.global_crop)))
                for im in images.images
            ]
        )
        emb = torch.cat([model(b.to(cfg.device)).cls.cpu() for b in x.split(64)])
    return NeighborIndex.from_embeddings(emb, k=cfg.num_neighbors)


def neighbor_agreement(
    neighbors: NeighborIndex, layouts: list[Any]
) -> dict[str, float]:
    """How often a positive shares the background photo / an object class.

    Chance levels are over all ordered pairs of different scenes.
    """

    def shares(i: int, j: int) -> tuple[bool, bool]:
        a, b = layouts[i], layouts[j]
        same_background = a.background == b.background
        classes = {o.class_id for o in a.objects} & {o.class_id for o in b.objects}
        return same_background, bool(classes)

    pairs = [(i, int(j)) for i in range(len(layouts)) for j in neighbors.neighbors[i]]
    others = [
        (i, j) for i in range(len(layouts)) for j in range(len(layouts)) if i != j
    ]
    result = {}
    for name, chosen in (("neighbors", pairs), ("chance", others)):
        flags = [shares(i, j) for i, j in chosen]
        result[f"{name}_same_background"] = statistics.mean(f[0] for f in flags)
        result[f"{name}_shared_class"] = statistics.mean(f[1] for f in flags)
    return result


@torch.no_grad()
def foreground_agreement(
    model: CoTAPVisionTransformer, samples: list[tuple[Tensor, Tensor]], patch: int
) -> dict[str, float]:
    """How well the teacher-style foreground mask (CLS attention) finds the objects.

    A patch is an object patch when most of its labelled pixels are objects.

    Returns:
        ``object_rate`` (share of object patches), ``precision`` (share of object
        patches among the masked ones) and ``recall`` (share of object patches that
        are masked); an uninformative mask has precision == object_rate.
    """
    images = torch.stack([image for image, _ in samples])
    masks = torch.stack([mask for _, mask in samples]).float()[:, None]
    device = next(model.parameters()).device
    fg = torch.cat(
        [
            model(b.to(device), return_fg_mask=True).fg_mask.cpu()
            for b in images.split(32)
        ]
    )
    valid = F.avg_pool2d((masks != 255).float(), patch)
    objects = F.avg_pool2d(((masks > 0) & (masks != 255)).float(), patch)
    is_object = (objects > 0.5 * valid)[:, 0]
    fg = fg.reshape(is_object.shape)
    return {
        "object_rate": float(is_object.float().mean()),
        "precision": float(is_object[fg].float().mean()),
        "recall": float(fg[is_object].float().mean()),
    }


def evaluate(
    model: CoTAPVisionTransformer, data: SeedData, cfg: Config, seed: int
) -> dict[str, float]:
    common: dict[str, Any] = dict(
        label_size=cfg.label_size,
        batch_size=32,
        module=model,
        device=cfg.device,
        seed=seed,
        linear_probe={"steps": cfg.probe_steps},
        overclustering_k=0,
        progress=False,
    )
    result = evaluate_dense(
        dense_feature_fn(model),
        data.probe,
        data.test,
        data.num_classes,
        kmeans={"n_init": 3},
        retrieval={"memory_size": cfg.memory_size},
        **common,
    )
    scores = {name: float(result[name]["miou"]) for name in METRICS[:3]}
    # Class-agnostic diagnostic: does a linear probe find the objects at all?
    objectness = evaluate_dense(
        dense_feature_fn(model),
        object_masks(data.probe),
        object_masks(data.test),
        2,
        kmeans={"skip": True},
        retrieval={"skip": True},
        **common,
    )
    scores["objectness"] = float(objectness["linear_probe"]["miou"])
    return scores


def object_masks(samples: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """The same images with masks 1 = any object, 0 = background (255 kept)."""
    return [
        (image, torch.where(mask == 255, mask, (mask > 0).to(mask.dtype)))
        for image, mask in samples
    ]
