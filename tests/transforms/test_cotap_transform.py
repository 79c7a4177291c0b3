from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.loss import roi_resample_to_grid
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, default_collate

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.transforms import cotap_transform
from lightly_cotap.transforms.cotap_transform import CoTAPTransform
from lightly_cotap.transforms.crop_alignment import (
    box_intersection,
    crop_pair_grid_boxes,
    image_boxes_to_grid,
    resample_crop_features,
)


def _coordinate_image(height: int, width: int) -> Tensor:
    """Float image whose channels 0/1 hold the x/y coordinate of each pixel centre."""
    ys, xs = torch.meshgrid(
        torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij"
    )
    return torch.stack([xs, ys, torch.zeros_like(xs)])


def _plain_transform(**kwargs: float) -> CoTAPTransform:
    """CoTAPTransform without colour augmentation and normalisation."""
    return CoTAPTransform(
        cj_prob=0.0,
        random_gray_scale=0.0,
        gaussian_blur=0.0,
        normalize=None,
        **kwargs,  # type: ignore[arg-type]
    )


def _intersection_area(a: Tensor, b: Tensor) -> Tensor:
    w = (
        torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])
    ).clamp(min=0)
    h = (
        torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])
    ).clamp(min=0)
    return w * h


class TestCoTAPTransform:
    def test_output_structure(self) -> None:
        transform = CoTAPTransform(n_local_views=3)
        views = transform(Image.new("RGB", (200, 150)))
        assert set(views) == {"student", "teacher", "boxes", "flipped", "image_size"}
        assert [tuple(v.shape) for v in views["student"]] == [(3, 224, 224)] * 2 + [
            (3, 96, 96)
        ] * 3
        assert [tuple(v.shape) for v in views["teacher"]] == [(3, 224, 224)] * 2
        assert views["boxes"].shape == (5, 4)
        assert views["boxes"].dtype == torch.float32
        assert views["flipped"].shape == (5,)
        assert not views["flipped"].any()  # no flip by default
        assert views["image_size"].tolist() == [150.0, 200.0]
        assert transform.n_views == 5
        assert transform.crop_sizes == [224, 224, 96, 96, 96]

    def test_default_collate(self) -> None:
        transform = CoTAPTransform(
            global_crop_size=64, local_crop_size=32, n_local_views=2
        )
        loader = DataLoader(SampleImageDataset(transform=transform), batch_size=3)
        views, targets = next(iter(loader))
        assert [tuple(v.shape) for v in views["student"]] == [(3, 3, 64, 64)] * 2 + [
            (3, 3, 32, 32)
        ] * 2
        assert [tuple(v.shape) for v in views["teacher"]] == [(3, 3, 64, 64)] * 2
        assert views["boxes"].shape == (3, 4, 4)
        assert views["flipped"].shape == (3, 4)
        assert views["image_size"].shape == (3, 2)
        assert targets.tolist() == [0, 0, 0]

    def test_boxes_inside_image_and_scale(self) -> None:
        torch.manual_seed(0)
        transform = CoTAPTransform()
        height, width = 480, 640
        area = height * width
        for _ in range(50):
            boxes = transform.sample_boxes(height=height, width=width)
            assert (boxes[:, :2] >= 0).all()
            assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            assert torch.equal(boxes, boxes.round())
            fraction = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / area
            # RandomResizedCrop rounds the side lengths, hence the slack.
            assert (fraction[:2] >= 0.25 * 0.97).all() and (fraction[:2] <= 1).all()
            assert (fraction[2:] >= 0.05 * 0.97).all()
            assert (fraction[2:] <= 0.1 * 1.03).all()

    @pytest.mark.parametrize("min_intersection", [0.01, 0.03])
    def test_overlap_constraint(self, min_intersection: float) -> None:
        torch.manual_seed(1)
        transform = CoTAPTransform(min_intersection=min_intersection)
        height, width = 300, 500
        area = height * width
        for _ in range(100):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fallback with these settings
                boxes = transform.sample_boxes(height=height, width=width)
            assert _intersection_area(boxes[0], boxes[1]) >= 2 * min_intersection * area
            for v in range(2, transform.n_views):
                for g in range(2):
                    inter = _intersection_area(boxes[v], boxes[g])
                    assert inter >= min_intersection * area

    def test_overlap_constraint_is_active(self) -> None:
        # Without the constraint, local crops often miss a global crop by 3% of the
        # area, so the previous test would fail if the constraint were not applied.
        torch.manual_seed(2)
        transform = CoTAPTransform(min_intersection=0.0)
        area = 300 * 500
        misses = 0
        for _ in range(100):
            boxes = transform.sample_boxes(height=300, width=500)
            for v in range(2, transform.n_views):
                for g in range(2):
                    misses += int(_intersection_area(boxes[v], boxes[g]) < 0.03 * area)
        assert misses > 10

    def test_overlap_fallback_warns_and_overlaps(self) -> None:
        # Local crops cover <= 10% of the image, so 40% overlap is impossible.
        torch.manual_seed(3)
        transform = CoTAPTransform(min_intersection=0.4, max_tries=3)
        with pytest.warns(UserWarning, match="min_intersection") as record:
            boxes = transform.sample_boxes(height=200, width=300)
        for v in range(1, transform.n_views):
            for g in range(min(v, 2)):
                assert _intersection_area(boxes[v], boxes[g]) > 0
        # One warning per crop that misses (here every crop after the first), naming
        # it, the limit and the image, reported at the caller (not in the library).
        messages = [str(w.message) for w in record]
        assert len(messages) == transform.n_views - 1
        assert messages[0].startswith("CoTAPTransform: crop 1 misses min_intersection")
        assert "after 3 tries on a 200x300 image" in messages[0]
        assert cotap_transform.__file__ not in {w.filename for w in record}

    def test_no_warning_when_the_overlap_is_reachable(self) -> None:
        torch.manual_seed(3)
        transform = CoTAPTransform()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(20):
                transform.sample_boxes(height=200, width=300)

    def test_crops_match_boxes_tensor_input(self) -> None:
        # Pixel values encode the original coordinates, so the value of output pixel
        # (u, v) must be the original coordinate the box maps it to.
        torch.manual_seed(4)
        transform = _plain_transform(hf_prob=0.5)
        image = _coordinate_image(300, 400)
        for _ in range(3):
            views = transform(image)
            for crop, box, flip, size in zip(
                views["student"],
                views["boxes"],
                views["flipped"],
                transform.crop_sizes,
            ):
                x0, y0, x1, y1 = box.tolist()
                u = torch.arange(size) + 0.5
                expected_x = x0 + u * (x1 - x0) / size
                expected_y = y0 + u * (y1 - y0) / size
                if flip:
                    expected_x = expected_x.flip(0)
                assert torch.allclose(
                    crop[0], expected_x[None, :].expand_as(crop[0]), atol=0.25
                )
                assert torch.allclose(
                    crop[1], expected_y[:, None].expand_as(crop[1]), atol=0.25
                )

    def test_crops_match_boxes_pil_input(self) -> None:
        torch.manual_seed(5)
        transform = _plain_transform()
        height, width = 200, 256
        ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        array = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
        views = transform(Image.fromarray(array))
        for crop, box, size in zip(
            views["student"], views["boxes"], transform.crop_sizes
        ):
            x0, y0, x1, y1 = box.tolist()
            u = torch.arange(size) + 0.5
            # uint8 pixel c holds c (its centre is at c + 0.5).
            expected_x = x0 + u * (x1 - x0) / size - 0.5
            expected_y = y0 + u * (y1 - y0) / size - 0.5
            values = crop[:2, 2:-2, 2:-2] * 255  # ToTensor scales to [0, 1]
            assert (values[0] - expected_x[None, 2:-2]).abs().max() < 1.0
            assert (values[1] - expected_y[2:-2, None]).abs().max() < 1.0

    def test_teacher_equals_student_without_colour_augmentation(self) -> None:
        transform = CoTAPTransform(
            cj_prob=0.0, random_gray_scale=0.0, gaussian_blur=0.0
        )
        views = transform(SampleImageDataset()[0][0])
        for student, teacher in zip(views["student"][:2], views["teacher"]):
            assert torch.equal(student, teacher)

    def test_teacher_is_unaugmented_crop_of_box(self) -> None:
        torch.manual_seed(6)
        image = SampleImageDataset()[2][0]
        transform = CoTAPTransform(cj_prob=1.0, random_gray_scale=0.0)
        views = transform(image)
        mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(3, 1, 1)
        std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(3, 1, 1)
        for k in range(2):
            x0, y0, x1, y1 = (int(v) for v in views["boxes"][k].tolist())
            crop = image.crop((x0, y0, x1, y1)).resize(
                (224, 224), resample=Image.Resampling.BILINEAR
            )
            expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1) / 255.0
            expected = (expected - mean) / std
            assert (views["teacher"][k] - expected).abs().mean() < 0.02
            # Colour jitter is applied to the student only.
            assert not torch.allclose(views["student"][k], views["teacher"][k])

    def test_flip_flips_student_and_teacher_together(self) -> None:
        torch.manual_seed(7)
        image = _coordinate_image(120, 160)
        views = _plain_transform(hf_prob=1.0)(image)
        assert views["flipped"].all()
        for student, teacher in zip(views["student"][:2], views["teacher"]):
            assert torch.equal(student, teacher)
            # x decreases from left to right in a flipped crop.
            assert (student[0, :, 1:] < student[0, :, :-1]).all()

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"global_crop_size": 0},
            {"local_crop_size": 0},
            {"local_crop_scale": (0.2, 0.1)},
            {"global_crop_scale": (0.0, 1.0)},
            {"global_crop_scale": (0.5, 1.5)},
            {"crop_ratio": (2.0, 1.0)},
            {"crop_ratio": (0.0, 1.0)},
            {"n_local_views": -1},
            {"min_intersection": 0.6},
            {"min_intersection": 0.5},
            {"max_tries": 0},
            {"hf_prob": 1.5},
            {"cj_prob": 1.5},
            {"random_gray_scale": -0.1},
            {"gaussian_blur": -0.1},
        ],
    )
    def test_invalid_arguments(self, kwargs: dict[str, object]) -> None:
        (name,) = kwargs
        with pytest.raises(ValueError, match=f"^{name} must"):
            CoTAPTransform(**kwargs)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"global_crop_size": 1, "local_crop_size": 1},
            {"global_crop_scale": (0.5, 0.5), "local_crop_scale": (1.0, 1.0)},
            {"crop_ratio": (1.0, 1.0)},
            {"n_local_views": 0},
            {"max_tries": 1},
            {"min_intersection": 0.0},
        ],
    )
    def test_boundary_arguments_are_accepted(self, kwargs: dict[str, object]) -> None:
        transform = CoTAPTransform(**kwargs)  # type: ignore[arg-type]
        boxes = transform.sample_boxes(height=40, width=50)
        assert boxes.shape == (transform.n_views, 4)

    def test_documented_defaults(self) -> None:
        transform = CoTAPTransform()
        assert transform.n_local_views == 4 and transform.max_tries == 100
        assert transform.min_intersection == 0.01 and transform.hf_prob == 0.0

    @pytest.mark.parametrize(
        ("kwargs", "expected"),
        [
            # The defaults: cj_prob 0.8, strength 1, jitter 0.8/0.8/0.8/0.2, gray
            # 0.2, blur 0.5 with sigmas (0.1, 2).
            ({}, (0.8, 0.8, 0.8, 0.8, 0.2, 0.2, 0.5, (0.1, 2.0))),
            (
                {
                    "cj_prob": 0.3,
                    "cj_strength": 0.5,
                    "cj_bright": 0.4,
                    "cj_contrast": 0.6,
                    "cj_sat": 1.0,
                    "cj_hue": 0.1,
                    "random_gray_scale": 0.7,
                    "gaussian_blur": 0.25,
                    "sigmas": (0.5, 1.0),
                },
                (0.3, 0.2, 0.3, 0.5, 0.05, 0.7, 0.25, (0.5, 1.0)),
            ),
        ],
    )
    def test_colour_parameters_are_passed_on(
        self,
        kwargs: dict[str, object],
        expected: tuple[float, float, float, float, float, float, float, object],
    ) -> None:
        cj_prob, bright, contrast, sat, hue, gray_p, blur_p, sigmas = expected
        transform = CoTAPTransform(**kwargs)  # type: ignore[arg-type]
        (jitter_apply, gray, blur, _, _) = transform.student_transform.transforms
        jitter = jitter_apply.transforms[0]
        assert jitter_apply.p == cj_prob
        assert jitter.brightness == pytest.approx((1 - bright, 1 + bright))
        assert jitter.contrast == pytest.approx((1 - contrast, 1 + contrast))
        assert jitter.saturation == pytest.approx((1 - sat, 1 + sat))
        assert jitter.hue == pytest.approx((-hue, hue))
        assert gray.p == gray_p
        assert (blur.prob, blur.sigmas) == (blur_p, sigmas)

    def test_disabled_colour_augmentations_are_left_out(self) -> None:
        transform = _plain_transform()
        assert [type(t).__name__ for t in transform.student_transform.transforms] == [
            "ToTensor"
        ]

    def test_certain_gray_scale_and_blur_are_applied(self) -> None:
        torch.manual_seed(15)
        image = torch.rand(3, 64, 64)
        gray = CoTAPTransform(
            cj_prob=0.0, random_gray_scale=1.0, gaussian_blur=0.0, normalize=None
        )(image)
        for view in gray["student"]:
            assert torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])
        blurred = CoTAPTransform(
            cj_prob=0.0,
            random_gray_scale=0.0,
            gaussian_blur=1.0,
            sigmas=(2.0, 2.0),
            normalize=None,
            global_crop_size=64,
            local_crop_size=32,
        )(image)
        for student, teacher in zip(blurred["student"][:2], blurred["teacher"]):
            # Blurring noise with sigma 2 flattens it.
            assert student.std() < 0.8 * teacher.std()

    def test_downscaled_crops_are_antialiased(self) -> None:
        # A one-pixel checkerboard averages to 0.5 when antialiased; plain bilinear
        # sampling would alias it.
        torch.manual_seed(16)
        ys, xs = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
        board = ((xs + ys) % 2).float().expand(3, -1, -1)
        transform = _plain_transform(global_crop_size=16, local_crop_size=8)
        views = transform(board)
        for crop, box, size in zip(
            views["student"], views["boxes"], transform.crop_sizes
        ):
            x0, y0, x1, y1 = (int(v) for v in box.tolist())
            expected = F.interpolate(
                board[None, :, y0:y1, x0:x1],
                size=(size, size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
            torch.testing.assert_close(crop, expected, atol=1e-5, rtol=0)

    def test_image_size_of_tensors_and_pil_images(self) -> None:
        assert cotap_transform._image_size(torch.zeros(5, 7)) == (5, 7)
        assert cotap_transform._image_size(torch.zeros(3, 5, 7)) == (5, 7)
        assert cotap_transform._image_size(torch.zeros(2, 3, 5, 7)) == (5, 7)
        assert cotap_transform._image_size(Image.new("RGB", (7, 5))) == (5, 7)
        with pytest.raises(ValueError, match="shape"):
            cotap_transform._image_size(torch.zeros(5))
        views = _plain_transform(n_local_views=0)(torch.rand(3, 50, 70))
        assert views["image_size"].dtype == torch.float32
        assert views["image_size"].tolist() == [50.0, 70.0]


class TestBoxGeometry:
    @pytest.mark.parametrize(
        ("a", "b", "area"),
        [
            ((0, 0, 10, 10), (5, 5, 20, 20), 25.0),
            ((0, 0, 10, 10), (20, 0, 30, 10), 0.0),  # apart along x
            ((0, 0, 10, 10), (0, 20, 10, 30), 0.0),  # apart along y
            ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching
            ((2, 3, 4, 9), (0, 0, 10, 10), 12.0),  # contained
        ],
    )
    def test_intersection_area(
        self, a: tuple[int, ...], b: tuple[int, ...], area: float
    ) -> None:
        assert cotap_transform._intersection_area(a, b) == area
        assert cotap_transform._intersection_area(b, a) == area

    def test_overlaps_threshold_is_inclusive_and_needs_a_positive_area(self) -> None:
        box = (0, 0, 10, 10)
        assert cotap_transform._overlaps(box, [(5, 5, 20, 20)], 25.0)
        assert not cotap_transform._overlaps(box, [(5, 5, 20, 20)], 25.5)
        assert cotap_transform._overlaps(box, [(9, 9, 20, 20)], 0.0)  # area 1
        assert not cotap_transform._overlaps(box, [(10, 0, 20, 10)], 0.0)
        assert not cotap_transform._overlaps(box, [(5, 5, 20, 20), (30, 0, 40, 9)], 1)
        assert cotap_transform._overlaps(box, [], 1e9)


def _script_random_boxes(
    monkeypatch: pytest.MonkeyPatch, first: tuple[int, ...], rest: tuple[int, ...]
) -> list[int]:
    """Makes _random_box return ``first`` once and then always ``rest``; returns a
    list that counts the draws.
    """
    calls: list[int] = []

    def scripted(*args: object) -> tuple[int, ...]:
        calls.append(1)
        return first if len(calls) == 1 else rest

    monkeypatch.setattr(cotap_transform, "_random_box", scripted)
    return calls


class TestOverlapFallback:
    @pytest.mark.parametrize("max_tries", [1, 3, 5])
    def test_draws_max_tries_boxes_per_crop(
        self, monkeypatch: pytest.MonkeyPatch, max_tries: int
    ) -> None:
        # Every later draw misses the first global crop entirely.
        calls = _script_random_boxes(monkeypatch, (0, 0, 50, 40), (150, 60, 160, 70))
        transform = CoTAPTransform(n_local_views=2, max_tries=max_tries)
        with pytest.warns(UserWarning, match="min_intersection"):
            transform.sample_boxes(height=100, width=200)
        assert len(calls) == 1 + 3 * max_tries

    @pytest.mark.parametrize(
        ("first", "rest", "expected"),
        [
            # Centred on the intersection, centre (x, y) = (60, 50): the later
            # draws (size 4 x 6) are moved to (58, 47, 62, 53).
            ((10, 20, 110, 80), (0, 0, 4, 6), (58, 47, 62, 53)),
            # Near the top left: the centred box (size 60 x 30) would start at
            # (-20, -5) and is clamped into the image.
            ((0, 0, 20, 20), (100, 50, 160, 80), (0, 0, 60, 30)),
            # Near the bottom right: it would end at (220, 105).
            ((180, 80, 200, 100), (0, 0, 60, 30), (140, 70, 200, 100)),
        ],
    )
    def test_fallback_box_is_centred_on_the_global_intersection(
        self,
        monkeypatch: pytest.MonkeyPatch,
        first: tuple[int, ...],
        rest: tuple[int, ...],
        expected: tuple[int, ...],
    ) -> None:
        _script_random_boxes(monkeypatch, first, rest)
        transform = CoTAPTransform(n_local_views=2, min_intersection=0.4, max_tries=2)
        with pytest.warns(UserWarning, match="min_intersection"):
            boxes = transform.sample_boxes(height=100, width=200)
        assert boxes[0].tolist() == list(first)
        for box in boxes[1:]:
            assert box.tolist() == list(expected)


class TestOverlapThresholds:
    def _boxes(self, min_intersection: float, seed: int, n_local_views: int) -> Tensor:
        torch.manual_seed(seed)
        transform = CoTAPTransform(
            min_intersection=min_intersection, n_local_views=n_local_views
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # reachable: no fallback boxes
            return torch.stack(
                [transform.sample_boxes(height=300, width=500) for _ in range(60)]
            )

    def test_local_crops_need_the_single_threshold(self) -> None:
        # Local crops must overlap each global crop by min_intersection (not twice
        # that), and are not constrained against each other.
        area = 300 * 500
        boxes = self._boxes(0.03, seed=17, n_local_views=4)
        local_global = torch.stack(
            [
                _intersection_area(boxes[:, v], boxes[:, g])
                for v in range(2, 6)
                for g in (0, 1)
            ]
        )
        assert (local_global >= 0.03 * area).all()
        assert (local_global < 0.06 * area).any()
        local_local = torch.stack(
            [
                _intersection_area(boxes[:, v], boxes[:, w])
                for v in range(2, 6)
                for w in range(v + 1, 6)
            ]
        )
        assert (local_local == 0).any()

    def test_global_crops_need_twice_the_threshold(self) -> None:
        area = 300 * 500
        boxes = self._boxes(0.1, seed=18, n_local_views=0)
        global_global = _intersection_area(boxes[:, 0], boxes[:, 1])
        assert (global_global >= 0.2 * area).all()
        assert (global_global < 0.3 * area).any()


def _interior(grid_boxes: Tensor, n: int, grid_size: int, flipped: Tensor) -> Tensor:
    """Output cells whose RoI bin lies where roi_align interpolates (no clamping)."""
    cells = torch.arange(n)
    bin_w = (grid_boxes[:, 2:3] - grid_boxes[:, 0:1]) / n
    bin_h = (grid_boxes[:, 3:4] - grid_boxes[:, 1:2]) / n
    inside_x = (grid_boxes[:, 0:1] + cells * bin_w >= 0.5) & (
        grid_boxes[:, 0:1] + (cells + 1) * bin_w <= grid_size - 0.5
    )
    inside_y = (grid_boxes[:, 1:2] + cells * bin_h >= 0.5) & (
        grid_boxes[:, 1:2] + (cells + 1) * bin_h <= grid_size - 0.5
    )
    mask = inside_y[:, :, None] & inside_x[:, None, :]
    # resample_crop_features mirrors the columns of flipped crops back.
    mask = torch.where(flipped[:, None, None], mask.flip(2), mask)
    return mask.reshape(-1, n * n)


class TestCropPairGridBoxes:
    @pytest.mark.parametrize("hf_prob", [0.0, 0.5])
    def test_roi_align_recovers_same_image_locations(self, hf_prob: float) -> None:
        # Simulate ViT-*/16 patch features by average pooling the coordinate image:
        # each feature cell then holds the original coordinate of its centre.
        torch.manual_seed(8)
        transform = _plain_transform(hf_prob=hf_prob)
        image = _coordinate_image(300, 400)
        batch = default_collate([transform(image) for _ in range(6)])
        # Channel-last (B, h, w, C) features, as the model outputs them.
        features = [
            F.avg_pool2d(view, 16).permute(0, 2, 3, 1) for view in batch["student"]
        ]
        boxes, flipped = batch["boxes"], batch["flipped"]
        if hf_prob > 0:
            assert flipped.any() and not flipped.all()
        n = 6
        checked = 0
        for i in range(2):
            for j in range(transform.n_views):
                if i == j:
                    continue
                size_i, size_j = features[i].shape[2], features[j].shape[2]
                box_i, box_j, valid = crop_pair_grid_boxes(
                    boxes, i, j, size_i, size_j, flipped
                )
                assert valid.all()  # every crop overlaps the global crops
                out_i = resample_crop_features(features[i], box_i, n, n, flipped[:, i])
                out_j = resample_crop_features(features[j], box_j, n, n, flipped[:, j])
                inter, _ = box_intersection(boxes[:, i], boxes[:, j])
                centres = torch.arange(n) + 0.5
                ex = inter[:, 0:1] + centres * (inter[:, 2:3] - inter[:, 0:1]) / n
                ey = inter[:, 1:2] + centres * (inter[:, 3:4] - inter[:, 1:2]) / n
                ex = ex[:, None, :].expand(-1, n, -1).reshape(-1, n * n)
                ey = ey[:, :, None].expand(-1, -1, n).reshape(-1, n * n)
                for out, box, size, flip in (
                    (out_i, box_i, size_i, flipped[:, i]),
                    (out_j, box_j, size_j, flipped[:, j]),
                ):
                    mask = _interior(box, n, size, flip)
                    error = torch.maximum(
                        (out[..., 0] - ex).abs(), (out[..., 1] - ey).abs()
                    )
                    assert error[mask].max() < 0.1
                    checked += int(mask.sum())
        assert checked > 500

    def test_without_flips_equals_lightly_roi_resample(self) -> None:
        torch.manual_seed(9)
        batch = default_collate(
            [_plain_transform()(_coordinate_image(100, 120)) for _ in range(3)]
        )
        features = F.avg_pool2d(batch["student"][0], 16)  # (B, C, h, w)
        box, _, _ = crop_pair_grid_boxes(batch["boxes"], 0, 3, 14, 6)
        expected = roi_resample_to_grid(features, box, 4, 4)
        channel_last = features.permute(0, 2, 3, 1)
        assert torch.equal(resample_crop_features(channel_last, box, 4, 4), expected)
        no_flip = torch.zeros(3, dtype=torch.bool)
        assert torch.equal(
            resample_crop_features(channel_last, box, 4, 4, no_flip), expected
        )

    def test_hand_computed_boxes(self) -> None:
        # Crop 0 covers x in [0, 100], y in [0, 50]; crop 1 covers [50, 150] x
        # [25, 75]. Intersection [50, 100] x [25, 50].
        boxes = torch.tensor([[0.0, 0.0, 100.0, 50.0], [50.0, 25.0, 150.0, 75.0]])
        box_0, box_1, valid = crop_pair_grid_boxes(boxes, 0, 1, 10, (5, 20))
        assert valid.item()
        assert torch.allclose(box_0, torch.tensor([5.0, 5.0, 10.0, 10.0]))
        assert torch.allclose(box_1, torch.tensor([0.0, 0.0, 10.0, 2.5]))
        flipped = torch.tensor([True, False])
        box_0, _, _ = crop_pair_grid_boxes(boxes, 0, 1, 10, (5, 20), flipped)
        assert torch.allclose(box_0, torch.tensor([0.0, 5.0, 5.0, 10.0]))

    def test_no_overlap_is_invalid(self) -> None:
        boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]]])
        box_0, box_1, valid = crop_pair_grid_boxes(boxes, 0, 1, 4, 4)
        assert valid.tolist() == [False]
        assert box_0.shape == (1, 4) and box_1.shape == (1, 4)
        # Degenerate boxes: zero width.
        assert (box_0[:, 2] - box_0[:, 0] == 0).all()

    def test_image_boxes_to_grid_full_crop(self) -> None:
        crop = torch.tensor([10.0, 20.0, 74.0, 52.0])
        assert torch.allclose(
            image_boxes_to_grid(crop, crop, (7, 14)),
            torch.tensor([0.0, 0.0, 14.0, 7.0]),
        )

    def test_invalid_inputs(self) -> None:
        boxes = torch.zeros(2, 3, 4)
        with pytest.raises(ValueError, match="out of range"):
            crop_pair_grid_boxes(boxes, 0, 3, 14, 6)
        with pytest.raises(ValueError, match="shape"):
            crop_pair_grid_boxes(torch.zeros(2, 3, 5), 0, 1, 14, 6)
        with pytest.raises(ValueError, match="grid_size"):
            crop_pair_grid_boxes(boxes, 0, 1, 0, 6)
        with pytest.raises(ValueError, match="flipped"):
            resample_crop_features(
                torch.zeros(2, 4, 6, 6),
                torch.zeros(2, 4),
                2,
                2,
                torch.zeros(3, dtype=torch.bool),
            )
