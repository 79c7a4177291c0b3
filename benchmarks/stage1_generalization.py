"""Does a stage-1 checkpoint know object classes beyond the cut-outs it was trained on?

Reads the checkpoints ``OUT/stage1/seed<N>.pth`` written by
``benchmarks/dense_quality.py`` and fits a logistic regression on the mean patch
features of object-centric images (the stage-1 image recipe) of the *training*
cut-outs; reports its accuracy on new images of the training cut-outs ("seen") and on
images of the held-out test cut-outs ("unseen"), next to a randomly initialised model
of the same architecture and the majority class. A large seen / unseen gap means stage
1 memorised its cut-outs rather than learning their classes. Usage::

    python benchmarks/stage1_generalization.py --run outputs/dense_quality
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from copy_paste_inputs import add_input_arguments
from dense_quality_config import Config, Paths
from dense_quality_data import object_centric_scenes
from dense_quality_train import backbone
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from lightly_cotap.data.copy_paste_scenes import Split
from lightly_cotap.data.segmentation_folder import image_to_tensor
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer


def object_images(
    paths: Paths, split: Split, seed: int, count: int, size: int
) -> tuple[Tensor, np.ndarray]:
    """Normalised object-centric images of one split and their class ids."""
    scenes = object_centric_scenes(
        paths.objects,
        paths.backgrounds,
        split=split,
        num_samples=count,
        image_size=size,
        seed=seed,
    )
    layouts = [scenes.layout(i) for i in range(count)]
    images = torch.stack([image_to_tensor(scenes.render(lay)[0]) for lay in layouts])
    return images, np.array([lay.objects[0].class_id for lay in layouts])


@torch.no_grad()
def mean_patch_features(model: CoTAPVisionTransformer, images: Tensor) -> np.ndarray:
    features = [model(batch).dense.mean((1, 2)) for batch in images.split(100)]
    return torch.cat(features).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--run", type=Path, default=Path("outputs/dense_quality"))
    add_input_arguments(parser)
    parser.add_argument("--images", type=int, default=1500, help="Training images.")
    args = parser.parse_args()
    checkpoints = sorted((args.run / "stage1").glob("seed*.pth"))
    if not checkpoints:
        parser.error(f"no stage-1 checkpoints in {args.run / 'stage1'}.")
    torch.set_num_threads(1)
    cfg = Config()
    paths = Paths(args.objects, args.backgrounds)
    size = cfg.stage1_image_size
    train = object_images(paths, "train", 77, args.images, size)
    seen = object_images(paths, "train", 78, args.images // 3, size)
    unseen = object_images(paths, "test", 79, args.images // 3, size)
    torch.manual_seed(0)
    models = [("random initialisation", backbone(cfg, use_filter=False).eval())]
    models += [
        (f"P {c.stem}", CoTAPVisionTransformer.from_checkpoint(c)) for c in checkpoints
    ]
    majority = np.bincount(unseen[1]).max() / len(unseen[1])
    print("| model | seen cut-outs | unseen cut-outs |\n|---|---:|---:|")
    for name, model in models:
        x_train = mean_patch_features(model, train[0])
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        classifier = LogisticRegression(max_iter=2000).fit(
            (x_train - mean) / std, train[1]
        )
        accuracy = [
            classifier.score((mean_patch_features(model, x) - mean) / std, y)
            for x, y in (seen, unseen)
        ]
        print(f"| {name} | {100 * accuracy[0]:.1f}% | {100 * accuracy[1]:.1f}% |")
    print(f"\nMajority class of the unseen images: {100 * majority:.1f}%.")


if __name__ == "__main__":
    main()
