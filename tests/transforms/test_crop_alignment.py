from __future__ import annotations

import pytest
import torch

from lightly_cotap.transforms.crop_alignment import (
    box_intersection,
    crop_pair_grid_boxes,
    image_boxes_to_grid,
)


def test_one_cell_grid() -> None:
    # The right half of a 40 x 20 crop on a 1 x 1 feature grid.
    crop = torch.tensor([10.0, 0.0, 50.0, 20.0])
    box = torch.tensor([30.0, 0.0, 50.0, 20.0])
    assert torch.equal(image_boxes_to_grid(box, crop, 1), torch.tensor([0.5, 0, 1, 1]))


def test_flip_flags_of_any_dtype() -> None:
    # x in [20, 30] of the crop [10, 50] is [2.5, 5] of a 10-wide grid, mirrored
    # [5, 7.5]; y in [0, 10] of [0, 20] is [0, 4] of an 8-high grid.
    crops = torch.tensor([[10.0, 0.0, 50.0, 20.0]] * 2)
    boxes = torch.tensor([[20.0, 0.0, 30.0, 10.0]] * 2)
    expected = torch.tensor([[5.0, 0.0, 7.5, 4.0], [2.5, 0.0, 5.0, 4.0]])
    for flipped in (
        torch.tensor([True, False]),
        torch.tensor([1, 0]),
        torch.tensor([1.0, 0.0]),
    ):
        grid = image_boxes_to_grid(boxes, crops, (8, 10), flipped)
        torch.testing.assert_close(grid, expected, rtol=0, atol=1e-6)


def test_boxes_that_only_touch_do_not_overlap() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[10.0, 0.0, 20.0, 10.0], [0.0, 10.0, 10.0, 20.0]])
    inter, valid = box_intersection(a, b)
    assert valid.tolist() == [False, False]
    assert torch.equal(
        inter, torch.tensor([[10.0, 0.0, 10.0, 10.0], [0.0, 10.0, 10.0, 10.0]])
    )
    _, valid = box_intersection(a, b + torch.tensor([-1e-3, 0.0, 0.0, 0.0]))
    assert valid.tolist() == [True, False]


def test_errors_name_the_argument() -> None:
    box = torch.zeros(4)
    with pytest.raises(ValueError, match=r"^grid_size must be a positive int"):
        image_boxes_to_grid(box, box, (0, 3))
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(4,\)"):
        image_boxes_to_grid(torch.zeros(3), box, 4)
    with pytest.raises(ValueError, match=r"shapes \(4,\) and \(5,\)"):
        image_boxes_to_grid(box, torch.zeros(5), 4)
    boxes = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"^i=3 is out of range for 3 crops"):
        crop_pair_grid_boxes(boxes, 3, 0, 4, 4)
    with pytest.raises(ValueError, match=r"^j=-1 is out of range for 3 crops"):
        crop_pair_grid_boxes(boxes, 0, -1, 4, 4)
    with pytest.raises(
        ValueError, match=r"^grid_size_i must be a positive int .* is \(0, 0\)"
    ):
        crop_pair_grid_boxes(boxes, 0, 1, 0, 4)
    with pytest.raises(ValueError, match=r"^grid_size_j must be .* is \(2, -1\)"):
        crop_pair_grid_boxes(boxes, 0, 1, 4, (2, -1))
