from __future__ import annotations

import numpy as np
import pytest
import torch
from lightly.data import LightlyDataset
from PIL import Image

from lightly_cotap.data.sample_images import (
    SampleImageDataset,
    load_sample_images,
    sample_image_dir,
    sample_image_paths,
)


def test_sample_image_files() -> None:
    paths = sample_image_paths()
    assert 6 <= len(paths) <= 8
    total_bytes = sum(p.stat().st_size for p in sample_image_dir().iterdir())
    assert total_bytes < 1.5 * 1024 * 1024
    licences = (sample_image_dir() / "LICENSES.md").read_text()
    for path in paths:
        # Every vendored image must have a licence entry.
        assert f"`{path.name}`" in licences


def test_load_sample_images_are_real_rgb_photos() -> None:
    images = load_sample_images()
    assert len(images) == len(sample_image_paths())
    for image in images:
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB"
        assert max(image.size) <= 512
        assert min(image.size) >= 200
        # Real photos have many distinct values (not a blank/synthetic image).
        assert len(np.unique(np.asarray(image))) > 100


def test_sample_image_dataset() -> None:
    dataset = SampleImageDataset()
    assert len(dataset) == len(sample_image_paths())
    image, target = dataset[0]
    assert isinstance(image, Image.Image)
    assert target == 0
    assert dataset.targets == [0] * len(dataset)
    assert dataset.filenames == [p.name for p in sample_image_paths()]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_sample_image_dataset_transform() -> None:
    def to_tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    dataset = SampleImageDataset(transform=to_tensor)
    tensor, _ = dataset[1]
    assert isinstance(tensor, torch.Tensor)
    assert tensor.shape[0] == 3


def test_lightly_dataset_reads_sample_folder() -> None:
    dataset = LightlyDataset(input_dir=str(sample_image_dir()))
    assert len(dataset) == len(sample_image_paths())
    _, target, fname = dataset[0]
    assert target == 0
    assert fname == sample_image_paths()[0].name
