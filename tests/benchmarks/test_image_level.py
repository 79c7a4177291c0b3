from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_a_training_repeats_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightly's solarization draws from NumPy's global generator: the run seeds it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from image_level_methods import Setup, make_backbone, run_byol

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        for _ in range(8)
    ]
    trunk, dim = make_backbone("cnn", 4)
    setup = Setup(
        trunk_state=copy.deepcopy(trunk.state_dict()),
        backbone="cnn",
        width=4,
        dim=dim,
        train_images=images,
        train_labels=[0, 1] * 4,
        image_size=16,
        batch_size=8,
        steps=4,
        lr=1e-3,
        seed=0,
    )
    first, _ = run_byol(setup, co_ssl=False)
    np.random.random(5)  # whatever ran in between
    second, _ = run_byol(setup, co_ssl=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
