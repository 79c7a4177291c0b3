"""Unlabelled images below a folder, checked once and read whatever their mode."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from tqdm import tqdm

from lightly_cotap.data.image_io import IMAGE_EXTENSIONS, image_problem, read_rgb_image


def list_image_files(root: str | os.PathLike[str]) -> list[str]:
    """Image files below a folder (any depth), relative and sorted.

    Hidden files and folders (names starting with ``.``, e.g. temporary files of
    atomic writes) are left out.

    Args:
        root: The folder.

    Returns:
        POSIX paths relative to ``root``.
    """
    root = Path(root)
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in (
                IMAGE_EXTENSIONS
            ):
                files.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(files)


class ImageFolderDataset(Dataset[tuple[Any, int, str]]):
    """The readable images below a folder, as ``(image, 0, relative file name)``.

    Like ``lightly.data.LightlyDataset`` on an image folder, but every file is
    checked once when the dataset is made (JPEGs are decoded at reduced scale, so
    the check is fast) and files that do not decode (empty, truncated, not an
    image) are left out and listed in :attr:`skipped` instead of failing a training
    run hours later. Images are read with
    :func:`~lightly_cotap.data.image_io.read_rgb_image` (16-bit, palette, CMYK and
    alpha images are converted correctly).

    Attributes:
        root: The folder.
        files: The readable image files (relative, sorted).
        skipped: ``(relative file, problem)`` of the files left out.
        transform: Optional callable applied to each RGB PIL image.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Any] | None = None,
        *,
        num_threads: int = 4,
        progress: bool = False,
    ) -> None:
        """Lists and checks the images.

        Args:
            root: The folder (searched at any depth).
            transform: Optional callable applied to each RGB PIL image.
            num_threads: Threads checking the files (decoding releases the GIL).
            progress: Show a progress bar while checking.

        Raises:
            NotADirectoryError: If ``root`` is not a folder.
        """
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a folder.")
        self.transform = transform
        names = list_image_files(self.root)
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            problems = list(
                tqdm(
                    pool.map(lambda name: image_problem(self.root / name), names),
                    total=len(names),
                    desc="check images",
                    disable=not progress,
                )
            )
        self.files = [n for n, p in zip(names, problems) if p is None]
        self.skipped = [(n, p) for n, p in zip(names, problems) if p is not None]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int, str]:
        """Returns ``(image, 0, relative file name)`` (the image transformed)."""
        image: Any = read_rgb_image(self.root / self.files[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, 0, self.files[index]
