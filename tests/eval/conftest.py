from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    """Runs the dense-evaluation tests on one intra-op thread.

    On a shared 2-core machine, torch's default thread pool makes the small probe
    trainings up to ~30x slower through oversubscription.
    """
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)
