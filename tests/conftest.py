from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    """Runs every test on one intra-op thread.

    The suite runs with ``pytest -n 2`` on 2 cores: one torch thread per worker avoids
    oversubscription, which made small trainings up to ~30x slower.
    """
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)
