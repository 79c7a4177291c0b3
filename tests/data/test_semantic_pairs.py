from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from lightly.data import LightlyDataset
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightly_cotap.data.neighbors import NeighborIndex
from lightly_cotap.data.sample_images import SampleImageDataset, sample_image_paths
from lightly_cotap.data.semantic_pairs import AugmentedPairDataset, SemanticPairDataset
from lightly_cotap.transforms import CoTAPTransform

# Class of each sample image (sorted by file name) in the class-folder fixture;
# class "c" has a single image.
CLASS_OF_IMAGE = ["a", "a", "a", "b", "b", "b", "b", "c"]


def _small_tensor(image: Image.Image) -> Tensor:
    """Deterministic image -> (3, 32, 32) tensor."""
    array = np.array(image.convert("RGB").resize((32, 32)), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


def _pool_backbone() -> nn.Module:
    """Parameter-free backbone: 4x4 colour layout, 48-D."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("class_folder")
    for path, label in zip(sample_image_paths(), CLASS_OF_IMAGE):
        (root / label).mkdir(exist_ok=True)
        shutil.copy(path, root / label / path.name)
    return root


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flat_folder")
    for path in sample_image_paths():
        shutil.copy(path, root / path.name)
    return root


def _index_of(view: Tensor, references: list[Tensor]) -> int:
    """Which image a _small_tensor view shows, given the views of all images."""
    matches = [i for i, ref in enumerate(references) if torch.equal(view, ref)]
    assert len(matches) == 1
    return matches[0]


def _references(dataset: SampleImageDataset) -> list[Tensor]:
    return [
        _small_tensor(image) for image, _ in (dataset[i] for i in range(len(dataset)))
    ]


class TestSemanticPairDataset:
    def test_neighbor_mode(self) -> None:
        torch.manual_seed(0)
        base = SampleImageDataset()
        neighbors = np.array([[(i + d) % 8 for d in (1, 2, 5)] for i in range(8)])
        pairs = SemanticPairDataset(
            base, neighbors=NeighborIndex(neighbors), transform=_small_tensor
        )
        assert pairs.mode == "neighbors" and len(pairs) == 8
        references = _references(base)
        for i in range(8):
            view, view_pos, index, index_pos = pairs[i]
            assert index == i and index_pos in neighbors[i]
            # The returned views show the images the indices name.
            assert _index_of(view, references) == index
            assert _index_of(view_pos, references) == index_pos
        seen: dict[int, set[int]] = {i: set() for i in range(8)}
        for _ in range(30):
            for i in range(8):
                index, index_pos = pairs.positive_index(i)
                assert index == i and index_pos in neighbors[i]
                seen[i].add(index_pos)
        # Uniform over all k neighbours: every neighbour gets drawn.
        assert all(seen[i] == set(neighbors[i].tolist()) for i in range(8))

    def test_transform_pos_and_raw_images(self) -> None:
        base = SampleImageDataset()
        neighbors = np.array([[(i + 1) % 8] for i in range(8)])
        pairs = SemanticPairDataset(
            base,
            neighbors=neighbors,
            transform=_small_tensor,
            transform_pos=lambda image: "positive",
        )
        view, view_pos, _, _ = pairs[0]
        assert isinstance(view, Tensor) and view_pos == "positive"
        raw = SemanticPairDataset(base, neighbors=neighbors)
        image, image_pos, _, index_pos = raw[3]
        assert isinstance(image, Image.Image) and index_pos == 4
        assert image_pos.size == base[4][0].size

    def test_p_self(self) -> None:
        torch.manual_seed(1)
        base = SampleImageDataset()
        neighbors = np.array([[(i + 1) % 8, (i + 2) % 8] for i in range(8)])
        always = SemanticPairDataset(
            base, neighbors=neighbors, p_self=1.0, transform=_small_tensor
        )
        for i in range(8):
            view, view_pos, index, index_pos = always[i]
            assert index_pos == index == i
            assert torch.equal(view, view_pos)
        half = SemanticPairDataset(base, neighbors=neighbors, p_self=0.5)
        draws = [half.positive_index(i % 8) for i in range(400)]
        self_fraction = np.mean([a == b for a, b in draws])
        assert 0.4 < self_fraction < 0.6

    def test_label_mode_torchvision_image_folder(self, class_folder: Path) -> None:
        torch.manual_seed(2)
        base = torchvision.datasets.ImageFolder(str(class_folder))
        with pytest.warns(
            UserWarning, match="1 of 3 classes have a single image"
        ) as record:
            pairs = SemanticPairDataset(base, mode="labels", transform=_small_tensor)
        assert len(record) == 1 and record[0].filename == __file__
        labels = np.array(base.targets)
        assert pairs.labels is not None and (pairs.labels == labels).all()
        partners: dict[int, set[int]] = {i: set() for i in range(len(base))}
        view, view_pos, _, _ = pairs[0]
        assert view.shape == view_pos.shape == (3, 32, 32)
        for _ in range(30):
            for i in range(len(base)):
                index, index_pos = pairs.positive_index(i)
                assert index == i
                partners[i].add(index_pos)
        for i in range(len(base)):
            same_class = set(np.nonzero(labels == labels[i])[0].tolist())
            if len(same_class) == 1:
                assert partners[i] == {i}  # singleton class: self pair
            else:
                assert partners[i] == same_class - {i}

    def test_label_mode_explicit_string_labels(self) -> None:
        base = SampleImageDataset()
        labels = ["x", "y"] * 4
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no class has a single image
            pairs = SemanticPairDataset(base, labels=labels)
        assert pairs.mode == "labels"
        for i in range(8):
            _, _, index, index_pos = pairs[i]
            assert index_pos != index and labels[index_pos] == labels[index]

    def test_label_mode_lightly_dataset_and_subset(self, class_folder: Path) -> None:
        base = LightlyDataset(input_dir=str(class_folder))
        with pytest.warns(UserWarning):
            pairs = SemanticPairDataset(base, mode="labels", transform=_small_tensor)
        view, view_pos, index, index_pos = pairs[0]
        assert view.shape == (3, 32, 32) and view_pos.shape == (3, 32, 32)
        targets = np.array(base.dataset.targets)
        assert targets[index] == targets[index_pos] and index != index_pos
        subset = Subset(torchvision.datasets.ImageFolder(str(class_folder)), [3, 4, 5])
        sub_pairs = SemanticPairDataset(subset, mode="labels")
        assert sub_pairs.labels is not None and (sub_pairs.labels == 1).all()

    def test_flat_folder_lightly_dataset_with_neighbors(
        self, flat_folder: Path
    ) -> None:
        base = LightlyDataset(input_dir=str(flat_folder))
        index = NeighborIndex.build(
            base, _pool_backbone(), k=2, transform=_small_tensor, progress=False
        )
        transform = CoTAPTransform(
            global_crop_size=32, local_crop_size=16, n_local_views=2
        )
        pairs = SemanticPairDataset(base, neighbors=index, transform=transform)
        loader = DataLoader(pairs, batch_size=4, shuffle=True)
        views, views_pos, indices, indices_pos = next(iter(loader))
        assert [tuple(v.shape) for v in views["student"]] == [(4, 3, 32, 32)] * 2 + [
            (4, 3, 16, 16)
        ] * 2
        assert views_pos["boxes"].shape == (4, 4, 4)
        assert indices.shape == (4,) and indices.dtype == torch.long
        for i, j in zip(indices.tolist(), indices_pos.tolist()):
            assert j in index.neighbors[i]

    def test_curated_pairs(self) -> None:
        base = SampleImageDataset()
        curated = [[0, 5], [5, 0], [2, 7]]
        pairs = SemanticPairDataset(base, pairs=curated, transform=_small_tensor)
        assert pairs.mode == "pairs" and len(pairs) == 3
        references = _references(base)
        for m, (a, b) in enumerate(curated):
            view, view_pos, index, index_pos = pairs[m]
            assert (index, index_pos) == (a, b)
            assert _index_of(view, references) == a
            assert _index_of(view_pos, references) == b
        with pytest.raises(IndexError):
            pairs[3]
        always_self = SemanticPairDataset(base, pairs=torch.tensor(curated), p_self=1.0)
        assert [always_self.positive_index(m) for m in range(3)] == [
            (0, 0),
            (5, 5),
            (2, 2),
        ]

    def test_seeded_draws(self) -> None:
        base = SampleImageDataset()
        neighbors = np.array([[(i + d) % 8 for d in (1, 2, 3, 4)] for i in range(8)])
        a = SemanticPairDataset(base, neighbors=neighbors, p_self=0.3, seed=7)
        b = SemanticPairDataset(base, neighbors=neighbors, p_self=0.3, seed=7)
        torch.manual_seed(0)
        draws_a = [a.positive_index(i) for i in range(8)]
        torch.manual_seed(1)  # the global RNG must not matter
        assert [b.positive_index(i) for i in range(8)] == draws_a
        a.set_epoch(1)
        assert [a.positive_index(i) for i in range(8)] != draws_a

    def test_augmented_pair_dataset(self) -> None:
        base = SampleImageDataset()
        pairs = AugmentedPairDataset(base, transform=_small_tensor)
        assert len(pairs) == 8
        view, view_pos, index, index_pos = pairs[6]
        assert index == index_pos == 6 and torch.equal(view, view_pos)
        matched = AugmentedPairDataset(base, indices=[0, 5, 2])
        assert len(matched) == 3
        assert [matched.positive_index(m) for m in range(3)] == [(0, 0), (5, 5), (2, 2)]
        assert SemanticPairDataset(base, mode="self").positive_index(4) == (4, 4)

    def test_invalid_arguments(self) -> None:
        base = SampleImageDataset()
        neighbors = np.array([[(i + 1) % 8] for i in range(8)])
        with pytest.raises(ValueError, match="different dataset"):
            SemanticPairDataset(
                base, neighbors=NeighborIndex.from_embeddings(torch.randn(7, 3), k=2)
            )
        with pytest.raises(ValueError, match="exactly one"):
            SemanticPairDataset(base)
        with pytest.raises(ValueError, match="exactly one"):
            SemanticPairDataset(base, neighbors=neighbors, labels=[0] * 8)
        with pytest.raises(ValueError, match="needs neighbors"):
            SemanticPairDataset(base, mode="neighbors")
        with pytest.raises(ValueError, match="does not use"):
            SemanticPairDataset(base, mode="pairs", labels=[0] * 8, pairs=[[0, 1]])
        with pytest.raises(ValueError, match="mode must be"):
            SemanticPairDataset(base, mode="knn")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="p_self"):
            SemanticPairDataset(base, neighbors=neighbors, p_self=1.5)
        with pytest.raises(ValueError, match=r"\[0, 8\)"):
            SemanticPairDataset(base, pairs=[[0, 8]])
        with pytest.raises(ValueError, match=r"\(M, 2\)"):
            SemanticPairDataset(base, pairs=[[0, 1, 2]])
        with pytest.raises(ValueError, match=r"shape \(8,\)"):
            SemanticPairDataset(base, labels=[0] * 7)
        with pytest.raises(ValueError, match="could not find labels"):
            SemanticPairDataset([base[0][0], base[1][0]], mode="labels")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"\[0, 8\)"):
            AugmentedPairDataset(base, indices=[9])
