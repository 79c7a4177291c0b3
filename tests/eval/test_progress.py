from __future__ import annotations

import io

import pytest

from lightly_cotap.eval import progress
from lightly_cotap.eval.progress import LineProgress, progress_bar


def test_lines_at_the_start_every_interval_and_at_the_end() -> None:
    out = io.StringIO()
    items = list(LineProgress(range(3), desc="features", interval=0.0, file=out))
    assert items == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "features: 0/3 (0%)",
        "features: 1/3 (33%)",
        "features: 2/3 (67%)",
        "features: 3/3 (100%)",
    ]
    assert all(line.endswith("00:00") for line in lines)  # elapsed time


def test_no_lines_between_start_and_end_within_the_interval() -> None:
    out = io.StringIO()
    with LineProgress(desc="k-means K=4", total=1, interval=3600.0, file=out) as bar:
        bar.update()
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == [
        "k-means K=4: 0/1 (0%)",
        "k-means K=4: 1/1 (100%)",
    ]


def test_progress_modes(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress_bar(range(2), desc="silent", progress=False)) == [0, 1]
    assert capsys.readouterr().err == ""
    assert list(progress_bar(range(2), desc="probe", progress="lines")) == [0, 1]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("probe: 0/2 (0%)") and err[-1].startswith("probe: 2/2")
    assert progress.LINE_INTERVAL == 30.0
