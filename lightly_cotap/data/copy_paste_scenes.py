"""Scene-centric segmentation data made by pasting real object cut-outs onto photos.

:class:`CopyPasteScenes` composes every sample from

- a random square crop of a real background photo, resized to ``image_size``;
- 1-3 real object cut-outs (RGBA photos whose alpha channel is the exact object mask,
  class = name of the folder they are in), scaled so their longest side is 0.3-0.7 of
  the image, randomly flipped and placed inside the image (or near its centre, with
  ``center_jitter``); later objects occlude earlier ones.

With ``augment_backgrounds=True`` the background is a
:class:`~lightly_cotap.data.background_views.BackgroundView` instead (half procedural
textures, half strongly augmented photo crops), so no background repeats
recognisably. One large centred object per image (``num_objects=(1, 1)``,
``object_scale=(0.55, 0.85)``, ``center_jitter=0.1``) gives object-centric images.

The mask holds the class id (folder index + 1) wherever the pasted alpha exceeds 128
and 0 (background) elsewhere. Samples are a pure function of ``(seed, index)``, so the
dataset is reproducible and safe with DataLoader workers. The objects of every class
and the background photos are split once (by ``split_seed``) into disjoint ``"train"``
and ``"test"`` pools, so a test scene contains neither an object nor a background seen
in training.

The two input folders are built by :mod:`lightly_cotap.data.copy_paste_sources`.

Over 400 lines because the dataset's one job (sample a layout, render it, save a
split) is documented argument by argument.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from lightly_cotap.atomic_write import save_image, write_json
from lightly_cotap.data.background_views import BackgroundView
from lightly_cotap.data.image_io import IMAGE_EXTENSIONS
from lightly_cotap.data.segmentation_folder import image_to_tensor

Split = Literal["train", "test", "all"]


@dataclass(frozen=True)
class PastedObject:
    """One object of a scene.

    Attributes:
        path: RGBA cut-out file.
        class_id: Label of the object (>= 1).
        box: ``(x0, y0, x1, y1)`` of the pasted, resized cut-out in the scene.
        flip: Whether the cut-out is mirrored horizontally.
    """

    path: Path
    class_id: int
    box: tuple[int, int, int, int]
    flip: bool


@dataclass(frozen=True)
class SceneLayout:
    """Everything needed to render one sample.

    Attributes:
        background: Background photo file.
        crop: ``(x0, y0, x1, y1)`` square crop of the background (in the loaded,
            possibly downscaled photo).
        objects: Objects in paste order (later ones occlude earlier ones).
        background_view: The augmented background that replaces the plain crop, or
            None.
    """

    background: Path
    crop: tuple[int, int, int, int]
    objects: tuple[PastedObject, ...]
    background_view: BackgroundView | None = None


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(
        p
        for p in folder.glob(pattern)
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _split_pool(
    items: Sequence[Path], split: Split, test_fraction: float, seed: int, name: str
) -> list[Path]:
    if split == "all":
        return list(items)
    if len(items) < 2:
        raise ValueError(
            f"{name} needs at least 2 files for disjoint train/test splits, got "
            f"{len(items)}."
        )
    # Seed from the split seed and the pool name, so pools are split independently.
    rng = np.random.default_rng([seed, *name.encode()])
    order = rng.permutation(len(items))
    num_test = min(len(items) - 1, max(1, int(round(test_fraction * len(items)))))
    chosen = order[:num_test] if split == "test" else order[num_test:]
    return sorted(items[i] for i in chosen)


def _alpha_bbox_crop(
    image: Image.Image, alpha_threshold: int, path: Path
) -> Image.Image:
    alpha = np.asarray(image.getchannel("A"))
    ys, xs = np.nonzero(alpha > alpha_threshold)
    if ys.size == 0:
        raise ValueError(
            f"cut-out {str(path)!r} has no pixel with alpha > {alpha_threshold}."
        )
    return image.crop(
        (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    )


class CopyPasteScenes(Dataset[tuple[Any, Tensor]]):
    """Scene-centric segmentation scenes from object cut-outs and background photos.

    Attributes:
        class_names: ``["background", *classes]``; the mask value of a class is its
            position in this list.
        num_classes: ``len(class_names)``.
        objects: Cut-out files of this split, per class id.
        backgrounds: Background photo files of this split.

    Examples:
        >>> train = CopyPasteScenes("objects", "backgrounds", split="train", seed=0)
        >>> test = CopyPasteScenes("objects", "backgrounds", split="test", seed=1)
        >>> image, mask = train[0]  # (3, 224, 224) normalised, (224, 224) int64
        >>> pil_image, mask_array = train.sample(0)
    """

    def __init__(
        self,
        objects_root: str | Path,
        backgrounds_root: str | Path,
        *,
        split: Split = "train",
        object_split: Split | None = None,
        num_samples: int = 1000,
        image_size: int = 224,
        num_objects: tuple[int, int] = (1, 3),
        object_scale: tuple[float, float] = (0.3, 0.7),
        center_jitter: float | None = None,
        augment_backgrounds: bool = False,
        classes: Sequence[str] | None = None,
        test_fraction: float = 0.3,
        seed: int = 0,
        split_seed: int = 0,
        alpha_threshold: int = 128,
        max_background_side: int | None = 1024,
        transform: Callable[[Image.Image], Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """Initializes the dataset and splits the object and background pools.

        Args:
            objects_root: Folder with one sub-folder of RGBA cut-outs per class.
            backgrounds_root: Folder of background photos (searched recursively).
            split: ``"train"``, ``"test"`` (disjoint objects and backgrounds) or
                ``"all"``.
            object_split: Split of the cut-outs when it differs from ``split``
                (``None``: ``split``); e.g. ``"all"`` with ``split="train"`` uses
                every cut-out of a pool that holds no test object on the training
                backgrounds.
            num_samples: Length of the dataset.
            image_size: Side of the square scenes.
            num_objects: Inclusive range of objects per scene.
            object_scale: Range of the pasted longest side, as a fraction of
                ``image_size``.
            center_jitter: If set, objects are centred, shifted by up to this
                fraction of ``image_size`` in x and y (kept inside the image);
                ``None`` places them uniformly.
            augment_backgrounds: Replace the plain background crop by a random
                :class:`~lightly_cotap.data.background_views.BackgroundView`.
            classes: Class folder names in label order; ``None`` uses the sorted
                sub-folders of ``objects_root``.
            test_fraction: Fraction of every class's objects and of the backgrounds
                held out for ``"test"``.
            seed: Seed of the scene sampling (use different seeds for train and test
                datasets).
            split_seed: Seed of the train/test partition of objects and backgrounds
                (keep it equal across the train and test datasets).
            alpha_threshold: Alpha above which a pasted pixel is labelled.
            max_background_side: Backgrounds are downscaled to this longest side when
                loaded (and kept in memory); ``None`` keeps full size.
            transform: Applied to the PIL scene image in ``__getitem__`` instead of
                the default ``ToTensor`` + normalisation.
            mean: Normalisation mean of the default transform (``None``: ImageNet).
            std: Normalisation std of the default transform (``None``: ImageNet).

        Raises:
            ValueError: If a folder or class is missing, a pool is too small to split,
                or a numeric argument is out of range.
        """
        objects_root, backgrounds_root = Path(objects_root), Path(backgrounds_root)
        for name, folder in (
            ("objects_root", objects_root),
            ("backgrounds_root", backgrounds_root),
        ):
            if not folder.is_dir():
                raise ValueError(f"{name} {str(folder)!r} is not a folder.")
        object_split = split if object_split is None else object_split
        for name, value in (("split", split), ("object_split", object_split)):
            if value not in ("train", "test", "all"):
                raise ValueError(
                    f"{name} must be 'train', 'test' or 'all', got {value!r}."
                )
        if num_samples <= 0 or image_size <= 0:
            raise ValueError(
                f"num_samples and image_size must be positive, got {num_samples} and "
                f"{image_size}."
            )
        if not 1 <= num_objects[0] <= num_objects[1]:
            raise ValueError(
                f"num_objects must satisfy 1 <= lo <= hi, got {num_objects}."
            )
        if not 0 < object_scale[0] <= object_scale[1] <= 1:
            raise ValueError(
                f"object_scale must satisfy 0 < lo <= hi <= 1, got {object_scale}."
            )
        if center_jitter is not None and not 0 <= center_jitter <= 0.5:
            raise ValueError(
                f"center_jitter must lie in [0, 0.5] or be None, got {center_jitter}."
            )
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
        if classes is None:
            classes = sorted(p.name for p in objects_root.iterdir() if p.is_dir())
        if len(classes) == 0:
            raise ValueError(
                f"objects_root {str(objects_root)!r} has no class folders."
            )
        self.class_names = ["background", *classes]
        self.num_classes = len(self.class_names)
        self.objects: dict[int, list[Path]] = {}
        for class_id, name in enumerate(classes, start=1):
            folder = objects_root / name
            files = _image_files(folder) if folder.is_dir() else []
            if not files:
                raise ValueError(f"class folder {str(folder)!r} has no images.")
            self.objects[class_id] = _split_pool(
                files, object_split, test_fraction, split_seed, f"objects/{name}"
            )
        self.backgrounds = _split_pool(
            _image_files(backgrounds_root, recursive=True),
            split,
            test_fraction,
            split_seed,
            "backgrounds",
        )
        if not self.backgrounds:
            raise ValueError(f"no background photos in {str(backgrounds_root)!r}.")
        self.split = split
        self.object_split = object_split
        self.num_samples = num_samples
        self.image_size = image_size
        self.num_objects = num_objects
        self.object_scale = object_scale
        self.center_jitter = center_jitter
        self.augment_backgrounds = augment_backgrounds
        self.seed = seed
        self.split_seed = split_seed
        self.alpha_threshold = alpha_threshold
        self.max_background_side = max_background_side
        self.transform = transform
        self.mean = mean
        self.std = std
        self._background_cache: dict[Path, Image.Image] = {}
        self._object_cache: dict[Path, Image.Image] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _background(self, path: Path) -> Image.Image:
        image = self._background_cache.get(path)
        if image is None:
            image = Image.open(path).convert("RGB")
            side = self.max_background_side
            if side is not None and max(image.size) > side:
                scale = side / max(image.size)
                size = (
                    max(1, round(image.width * scale)),
                    max(1, round(image.height * scale)),
                )
                image = image.resize(size, Image.Resampling.BILINEAR)
            self._background_cache[path] = image
        return image

    def _object(self, path: Path) -> Image.Image:
        image = self._object_cache.get(path)
        if image is None:
            with Image.open(path) as raw:
                image = _alpha_bbox_crop(
                    raw.convert("RGBA"), self.alpha_threshold, path
                )
            self._object_cache[path] = image
        return image

    def layout(self, index: int) -> SceneLayout:
        """Draws the random layout of sample ``index`` (deterministic in seed, index).

        Classes are drawn uniformly, then a cut-out uniformly within the class.

        Args:
            index: Sample index in ``[0, len(self))``.

        Returns:
            The :class:`SceneLayout`.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range [0, {self.num_samples}).")
        rng = np.random.default_rng([self.seed, index])
        size = self.image_size
        bg_path = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        bg = self._background(bg_path)
        max_side = min(bg.size)
        side = int(rng.integers(min(size, max_side), max_side + 1))
        x0 = int(rng.integers(0, bg.width - side + 1))
        y0 = int(rng.integers(0, bg.height - side + 1))
        objects = []
        class_ids = sorted(self.objects)
        for _ in range(int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))):
            class_id = class_ids[int(rng.integers(len(class_ids)))]
            pool = self.objects[class_id]
            path = pool[int(rng.integers(len(pool)))]
            obj = self._object(path)
            longest = rng.uniform(*self.object_scale) * size
            scale = longest / max(obj.size)
            w = min(size, max(1, round(obj.width * scale)))
            h = min(size, max(1, round(obj.height * scale)))
            flip = bool(rng.random() < 0.5)
            if self.center_jitter is None:
                x = int(rng.integers(0, size - w + 1))
                y = int(rng.integers(0, size - h + 1))
            else:
                x, y = (
                    int(
                        np.clip(
                            round((size - extent) / 2 + shift * size), 0, size - extent
                        )
                    )
                    for extent, shift in zip(
                        (w, h), rng.uniform(-self.center_jitter, self.center_jitter, 2)
                    )
                )
            objects.append(PastedObject(path, class_id, (x, y, x + w, y + h), flip))
        view = None
        if self.augment_backgrounds:
            # A separate stream, so the layouts without augmentation stay unchanged.
            view = BackgroundView.draw(
                np.random.default_rng([self.seed, index, 1]), bg.size
            )
        return SceneLayout(
            bg_path, (x0, y0, x0 + side, y0 + side), tuple(objects), view
        )

    def render(self, layout: SceneLayout) -> tuple[Image.Image, np.ndarray]:
        """Renders a layout.

        Args:
            layout: Layout from :meth:`layout`.

        Returns:
            ``(image, mask)``: RGB PIL image of size ``image_size`` and the label map.
            Mask shape: (image_size, image_size), uint8.
        """
        size = self.image_size
        photo = self._background(layout.background)
        if layout.background_view is not None:
            scene = layout.background_view.render(photo, size)
        else:
            scene = photo.resize(
                (size, size), Image.Resampling.BILINEAR, box=layout.crop
            )
        mask = np.zeros((size, size), dtype=np.uint8)
        for obj in layout.objects:
            x0, y0, x1, y1 = obj.box
            # Pillow resizes RGBA with premultiplied alpha (no colour fringes).
            cutout = self._object(obj.path).resize(
                (x1 - x0, y1 - y0), Image.Resampling.BILINEAR
            )
            if obj.flip:
                cutout = cutout.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            alpha = cutout.getchannel("A")
            scene.paste(cutout.convert("RGB"), (x0, y0), mask=alpha)
            region = mask[y0:y1, x0:x1]
            region[np.asarray(alpha) > self.alpha_threshold] = obj.class_id
        return scene, mask

    def sample(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Raw sample ``index``.

        Args:
            index: Sample index.

        Returns:
            ``(image, mask)``: RGB PIL image and uint8 label map (H, W).
        """
        return self.render(self.layout(index))

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        """Sample ``index`` as tensors.

        Args:
            index: Sample index.

        Returns:
            ``(image, mask)``: the normalised image (3, S, S) float32 (or
            ``transform(image)``) and the label map (S, S) int64.
        """
        image, mask = self.sample(index)
        out = (
            self.transform(image)
            if self.transform is not None
            else image_to_tensor(image, mean=self.mean, std=self.std)
        )
        return out, torch.from_numpy(mask.astype(np.int64))

    def save(
        self,
        out_dir: str | Path,
        *,
        image_format: Literal["jpg", "png"] = "jpg",
        progress: bool = True,
    ) -> Path:
        """Writes all samples as ``images/`` + ``masks/`` folders with matching stems.

        Masks are PNGs whose pixel values are class ids (0 = background). A
        ``classes.json`` lists the class names; it is read by nothing in the library
        and only documents the ids.

        Args:
            out_dir: Output folder.
            image_format: ``"jpg"`` (quality 95) or ``"png"`` (lossless) images.
            progress: Show a tqdm progress bar.

        Returns:
            ``out_dir``.
        """
        out_dir = Path(out_dir)
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        (out_dir / "masks").mkdir(parents=True, exist_ok=True)
        digits = max(5, len(str(self.num_samples - 1)))
        for i in tqdm(
            range(self.num_samples), desc=f"write {self.split}", disable=not progress
        ):
            image, mask = self.sample(i)
            stem = f"{i:0{digits}d}"
            if image_format == "jpg":
                save_image(image, out_dir / "images" / f"{stem}.jpg", quality=95)
            else:
                save_image(image, out_dir / "images" / f"{stem}.png")
            save_image(Image.fromarray(mask), out_dir / "masks" / f"{stem}.png")
        meta = {
            "class_names": self.class_names,
            "split": self.split,
            "object_split": self.object_split,
            "num_samples": self.num_samples,
            "image_size": self.image_size,
            "seed": self.seed,
            "split_seed": self.split_seed,
            "num_objects": {
                self.class_names[c]: len(v) for c, v in self.objects.items()
            },
            "num_backgrounds": len(self.backgrounds),
        }
        write_json(out_dir / "classes.json", meta)
        return out_dir
