"""The embedded default image set: a few real photographs with permissive licences.

The images live in ``lightly_cotap/data/sample_images/`` (package data) and come from
the CC0 / public-domain sample data of scikit-image plus one CC BY 2.0 photo from
scikit-learn; ``sample_images/LICENSES.md`` lists the source and licence of each file.
They are small (longest side <= 512 px) and meant for smoke runs, demos and tests,
e.g. the ``lightly-cotap train`` command without a data argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from PIL import Image
from torch.utils.data import Dataset

from lightly_cotap.data.image_io import read_rgb_image

#: File extensions recognised as images in the sample folder.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")


def sample_image_dir() -> Path:
    """Returns the folder that holds the embedded sample images.

    The folder can also be passed to ``lightly.data.LightlyDataset(input_dir=...)``
    (its ``LICENSES.md`` is ignored there because it is not an image).

    Returns:
        Path of ``lightly_cotap/data/sample_images``.
    """
    return Path(__file__).resolve().parent / "sample_images"


def sample_image_paths() -> list[Path]:
    """Returns the paths of the embedded sample images, sorted by file name.

    Returns:
        List of image paths (8 images in this release).

    Raises:
        FileNotFoundError: If the package was installed without its data files.
    """
    directory = sample_image_dir()
    paths = sorted(
        p for p in directory.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        raise FileNotFoundError(
            f"No sample images found in {directory}. The package data "
            "'lightly_cotap/data/sample_images/*' is missing from this installation."
        )
    return paths


def load_sample_images() -> list[Image.Image]:
    """Loads all embedded sample images as RGB PIL images.

    Returns:
        List of RGB ``PIL.Image.Image`` objects in the order of
        :func:`sample_image_paths`.
    """
    return [read_rgb_image(path) for path in sample_image_paths()]


class SampleImageDataset(Dataset[tuple[Any, int]]):
    """Map-style dataset over the embedded sample images.

    Returns ``(image, 0)`` tuples like a torchvision dataset of unlabelled images
    (and like ``lightly.data.LightlyDataset`` on a flat folder, minus the file name),
    so it can be wrapped by :class:`~lightly_cotap.data.SemanticPairDataset` or used
    with any Lightly transform.

    Attributes:
        transform: Optional callable applied to each RGB PIL image.
        paths: Image paths, sorted by file name.
        targets: One target per image; all 0 (the images are unlabelled).

    Examples:
        >>> from lightly_cotap.data import SampleImageDataset
        >>> from lightly.transforms import SimCLRTransform
        >>> dataset = SampleImageDataset(transform=SimCLRTransform(input_size=96))
        >>> views, target = dataset[0]
    """

    def __init__(self, transform: Callable[[Image.Image], Any] | None = None) -> None:
        """Initializes the dataset.

        Args:
            transform: Optional callable applied to each RGB PIL image.
        """
        self.transform = transform
        self.paths = sample_image_paths()
        self.targets = [0] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Returns the (transformed) image at ``index`` and its target 0.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(
                f"index {index} is out of range for {len(self)} sample images."
            )
        image: Any = read_rgb_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    @property
    def filenames(self) -> list[str]:
        """File names of the images (without directory)."""
        return [p.name for p in self.paths]
