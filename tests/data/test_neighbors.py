from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Subset

from lightly_cotap.data.embedding import embed_dataset
from lightly_cotap.data.neighbors import NeighborIndex, cosine_topk_neighbors
from lightly_cotap.data.sample_images import SampleImageDataset


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
