from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torchvision
from lightly.data import LightlyDataset
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightly_cotap.data.sample_images import SampleImageDataset, sample_image_paths
from lightly_cotap.data.semantic_pairs import (
    AugmentedPairDataset,
    NeighborIndex,
    SemanticPairDataset,
    cosine_topk_neighbors,
    embed_dataset,
)
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


def _brute_force(features: Tensor, k: int) -> tuple[Tensor, Tensor]:
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True)
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    order = sims.argsort(dim=1, descending=True)[:, :k]
    return order, sims.gather(1, order)


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


class TestCosineTopkNeighbors:
    @pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 1000])
    def test_matches_brute_force(self, chunk_size: int) -> None:
        features = torch.randn(37, 8, generator=torch.Generator().manual_seed(0))
        indices, sims = cosine_topk_neighbors(features, 5, chunk_size=chunk_size)
        expected_indices, expected_sims = _brute_force(features, 5)
        assert indices.dtype == torch.long and indices.shape == (37, 5)
        assert torch.equal(indices, expected_indices)
        assert torch.allclose(sims.double(), expected_sims, atol=1e-6)

    def test_self_excluded_but_duplicates_kept(self) -> None:
        features = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
        features[9] = features[2]  # duplicate image: same embedding, other index
        indices, sims = cosine_topk_neighbors(features, 3, chunk_size=4)
        assert not (indices == torch.arange(12)[:, None]).any()
        assert indices[2, 0] == 9 and indices[9, 0] == 2
        assert sims[2, 0] == pytest.approx(1.0, abs=1e-6)

    def test_invalid_inputs(self) -> None:
        features = torch.randn(6, 3)
        for k in (0, 6):
            with pytest.raises(ValueError, match="k must be"):
                cosine_topk_neighbors(features, k)
        with pytest.raises(ValueError, match="shape"):
            cosine_topk_neighbors(torch.randn(6), 2)
        with pytest.raises(ValueError, match="chunk_size"):
            cosine_topk_neighbors(features, 2, chunk_size=0)
        features[1, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            cosine_topk_neighbors(features, 2)


class TestNeighborIndex:
    def test_build_matches_manual_embedding(self) -> None:
        dataset = SampleImageDataset()
        backbone = _pool_backbone()
        index = NeighborIndex.build(
            dataset,
            backbone,
            k=3,
            transform=_small_tensor,
            batch_size=3,
            progress=False,
        )
        images = torch.stack(
            [
                _small_tensor(image)
                for image, _ in (dataset[i] for i in range(len(dataset)))
            ]
        )
        expected, expected_sims = _brute_force(backbone(images), 3)
        assert index.neighbors.shape == (8, 3) and index.k == 3 and len(index) == 8
        assert index.neighbors.dtype == np.int64
        np.testing.assert_array_equal(index.neighbors, expected.numpy())
        assert index.similarities is not None
        np.testing.assert_allclose(index.similarities, expected_sims.numpy(), atol=1e-5)

    def test_embed_outputs(self) -> None:
        dataset = SampleImageDataset()
        backbone = _pool_backbone()

        @dataclass
        class Output:
            cls: Tensor

        class ClsModel(nn.Module):
            def forward(self, x: Tensor) -> Output:
                return Output(cls=backbone(x))

        class DictModel(nn.Module):
            def forward(self, x: Tensor) -> dict[str, Tensor]:
                return {"cls": backbone(x)}

        kwargs = dict(transform=_small_tensor, batch_size=5, progress=False)
        reference = embed_dataset(dataset, backbone, **kwargs)  # type: ignore[arg-type]
        assert reference.shape == (8, 48)
        assert torch.allclose(reference.norm(dim=1), torch.ones(8))
        for other in (
            embed_dataset(dataset, ClsModel(), **kwargs),  # type: ignore[arg-type]
            embed_dataset(dataset, DictModel(), **kwargs),  # type: ignore[arg-type]
            embed_dataset(dataset, embed_fn=backbone, **kwargs),  # type: ignore[arg-type]
        ):
            assert torch.allclose(other, reference)

    def test_embed_restores_training_mode_and_validates(self) -> None:
        dataset = SampleImageDataset()
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Flatten(2))
        model.train()
        with pytest.raises(ValueError, match=r"\(B, D\)"):
            embed_dataset(dataset, model, transform=_small_tensor, progress=False)
        assert model.training
        with pytest.raises(ValueError, match="exactly one"):
            embed_dataset(dataset, transform=_small_tensor)
        with pytest.raises(ValueError, match="cls"):
            embed_dataset(
                dataset,
                embed_fn=lambda x: [x],  # type: ignore[arg-type, return-value]
                transform=_small_tensor,
                progress=False,
            )

    def test_build_with_timm_vit_and_default_transform(self) -> None:
        vit = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1
        )
        index = NeighborIndex.build(SampleImageDataset(), vit, k=2, progress=False)
        assert index.neighbors.shape == (8, 2)
        assert not (index.neighbors == np.arange(8)[:, None]).any()

    def test_save_load_round_trip(self, tmp_path: Path) -> None:
        features = torch.randn(20, 6, generator=torch.Generator().manual_seed(2))
        index = NeighborIndex.from_embeddings(features, k=4)
        path = index.save(tmp_path / "nns")
        assert path == tmp_path / "nns.npz" and path.exists()
        loaded = NeighborIndex.load(path, expected_length=20)
        np.testing.assert_array_equal(loaded.neighbors, index.neighbors)
        assert loaded.similarities is not None and index.similarities is not None
        np.testing.assert_array_equal(loaded.similarities, index.similarities)
        assert loaded.k == 4
        first_two = NeighborIndex.load(path, k=2)
        np.testing.assert_array_equal(first_two.neighbors, index.neighbors[:, :2])
        with pytest.raises(ValueError, match="different dataset"):
            NeighborIndex.load(path, expected_length=21)
        with pytest.raises(ValueError, match="k must be"):
            NeighborIndex.load(path, k=5)

    def test_load_or_build_reuses_cache(self, tmp_path: Path) -> None:
        dataset = SampleImageDataset()
        path = tmp_path / "cache.npz"
        kwargs: dict[str, Any] = dict(transform=_small_tensor, progress=False)
        built = NeighborIndex.load_or_build(
            path, dataset, _pool_backbone(), k=2, **kwargs
        )
        assert path.exists()

        def fail(images: Tensor) -> Tensor:
            raise AssertionError("the cached index must be reused")

        reused = NeighborIndex.load_or_build(
            path, dataset, embed_fn=fail, k=2, **kwargs
        )
        np.testing.assert_array_equal(reused.neighbors, built.neighbors)
        with pytest.raises(ValueError, match="k=2"):
            NeighborIndex.load_or_build(path, dataset, embed_fn=fail, k=3, **kwargs)
        with pytest.raises(ValueError, match="different dataset"):
            NeighborIndex.load_or_build(
                path, Subset(dataset, range(5)), embed_fn=fail, k=2, **kwargs
            )

    def test_load_or_build_with_cache_key_rebuilds_stale_files(
        self, tmp_path: Path
    ) -> None:
        dataset = SampleImageDataset()
        path = tmp_path / "cache.npz"
        kwargs: dict[str, Any] = dict(transform=_small_tensor, progress=False)
        built = NeighborIndex.load_or_build(
            path, dataset, _pool_backbone(), k=2, cache_key="images-a", **kwargs
        )
        assert NeighborIndex.stored_cache_key(path) == "images-a"

        def fail(images: Tensor) -> Tensor:
            raise AssertionError("the cached index must be reused")

        reused = NeighborIndex.load_or_build(
            path, dataset, embed_fn=fail, k=2, cache_key="images-a", **kwargs
        )
        np.testing.assert_array_equal(reused.neighbors, built.neighbors)
        # Same number of images, other key (other files, weights or k): rebuilt.
        calls = []

        def embed(images: Tensor) -> Tensor:
            calls.append(len(images))
            return images.flatten(1)

        rebuilt = NeighborIndex.load_or_build(
            path, dataset, embed_fn=embed, k=3, cache_key="images-b", **kwargs
        )
        assert sum(calls) == len(dataset) and rebuilt.k == 3
        assert NeighborIndex.stored_cache_key(path) == "images-b"
        assert NeighborIndex.stored_cache_key(tmp_path / "missing.npz") is None

    def test_load_official_nns_format(self, tmp_path: Path) -> None:
        # STEGO/CoTAP files list the image itself (usually first) among its top-k.
        nns = np.array([[0, 1, 2], [1, 0, 2], [3, 2, 0], [3, 0, 1]])  # row 2: dup first
        np.savez(tmp_path / "official.npz", nns=nns)
        index = NeighborIndex.load(tmp_path / "official.npz")
        np.testing.assert_array_equal(index.neighbors, [[1, 2], [0, 2], [3, 0], [0, 1]])
        assert index.similarities is None

    def test_invalid_arrays(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="own index"):
            NeighborIndex(np.array([[1], [1]]))
        with pytest.raises(ValueError, match=r"\[0, 2\)"):
            NeighborIndex(np.array([[1], [2]]))
        with pytest.raises(ValueError, match="integer"):
            NeighborIndex(np.array([[1.0], [0.0]]))
        with pytest.raises(ValueError, match="shape"):
            NeighborIndex(np.array([1, 0]))
        np.savez(tmp_path / "bad.npz", other=np.zeros(3))
        with pytest.raises(ValueError, match="neither"):
            NeighborIndex.load(tmp_path / "bad.npz")


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
