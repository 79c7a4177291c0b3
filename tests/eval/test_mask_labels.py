"""Edges of the label checks of ``eval``: the last class, the ignore value, labels
that only the validation masks hold, and the mapping applied to every mask.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lightly_cotap.eval.mask_labels import (
    LabelMapping,
    MaskScan,
    class_names_file,
    decide_classes,
    scan_masks,
)
from lightly_cotap.user_errors import UsageError


def _scan(counts: dict[int, int], option: str = "--masks") -> MaskScan:
    scan = MaskScan(pixel_counts=Counter(counts))
    scan.files = {v: [(option, Path(f"mask_{v}.png"))] for v in counts}
    return scan


def _decide(scan: MaskScan, **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        num_classes=None,
        declared_by="--num-classes",
        ignore_index=255,
        ignore_index_given=False,
        ignore_unknown=False,
    )
    options.update(kwargs)
    return decide_classes(scan, **options)


def _write_pairs(folder: Path, masks: list[np.ndarray]) -> list[tuple[Path, Path]]:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    samples = []
    for i, mask in enumerate(masks):
        image_path = folder / "images" / f"{i}.png"
        mask_path = folder / "masks" / f"{i}_mask.png"
        Image.new("RGB", mask.shape[::-1]).save(image_path)
        Image.fromarray(mask.astype(np.uint8)).save(mask_path)
        samples.append((image_path, mask_path))
    return samples


class TestDeclaredClasses:
    def test_label_equal_to_num_classes_is_outside(self) -> None:
        with pytest.raises(UsageError, match=r"labels \[3\] \(2 pixels\) lie outside"):
            _decide(_scan({0: 10, 1: 5, 2: 4, 3: 2}), num_classes=3)

    def test_last_class_is_inside(self) -> None:
        decision = _decide(_scan({0: 10, 1: 5, 2: 4}), num_classes=3)
        assert decision.num_classes == 3
        assert decision.mapping is None and decision.messages == []

    def test_label_equal_to_num_classes_is_ignored_on_request(self) -> None:
        decision = _decide(
            _scan({0: 10, 1: 5, 2: 4, 3: 2, 255: 7}), num_classes=3, ignore_unknown=True
        )
        assert decision.num_classes == 3
        assert decision.messages == [
            "--masks: ignoring 2 pixels with labels [3] outside the 3 classes "
            "(in mask_3.png)"
        ]
        mapped = decision.mapping(np.array([0, 1, 2, 3, 4, 255]))
        assert mapped.tolist() == [0, 1, 2, 255, 255, 255]

    def test_ignore_value_is_no_label(self) -> None:
        # 255 (the ignore value) lies outside the 2 classes but is not unknown.
        decision = _decide(_scan({0: 10, 1: 5, 255: 3}), num_classes=2)
        assert decision.num_classes == 2 and decision.mapping is None

    def test_explicit_ignore_value_inside_the_classes(self) -> None:
        # --ignore-index 0: label 0 is ignored, 1 and 2 are the labelled classes.
        decision = _decide(
            _scan({0: 10, 1: 5, 2: 4}),
            num_classes=3,
            ignore_index=0,
            ignore_index_given=True,
        )
        assert decision.num_classes == 3
        # Undeclared, labels 1..2 without 0 do not define the classes.
        with pytest.raises(UsageError, match="--num-classes"):
            _decide(_scan({0: 10, 1: 5, 2: 4}), ignore_index=0, ignore_index_given=True)

    def test_negative_label_is_outside(self) -> None:
        with pytest.raises(UsageError, match=r"labels \[-1\]"):
            _decide(_scan({-1: 1, 0: 10, 1: 5}), num_classes=2)
        with pytest.raises(UsageError, match="holds label -1"):
            _decide(_scan({-1: 1, 0: 10, 1: 5}))

    def test_fewer_than_two_declared_classes(self) -> None:
        with pytest.raises(UsageError, match="at least 2 classes"):
            _decide(_scan({0: 10, 1: 5}), num_classes=1)


class TestInferredClasses:
    def test_gap_free_labels_define_the_classes(self) -> None:
        decision = _decide(_scan({0: 10, 1: 5, 2: 1, 255: 9}))
        assert decision.num_classes == 3 and decision.mapping is None

    def test_one_stray_value_is_refused(self) -> None:
        with pytest.raises(UsageError, match=r"holds label 200 \(1 pixels\)"):
            _decide(_scan({0: 10, 1: 5, 200: 1}))

    def test_only_ignored_pixels(self) -> None:
        with pytest.raises(UsageError, match="every mask pixel equals it"):
            _decide(_scan({255: 10}))
        with pytest.raises(UsageError, match=r"every labelled pixel is class \[0\]"):
            _decide(_scan({0: 10, 255: 4}), num_classes=3)

    def test_0_255_masks_are_binary_unless_255_is_the_given_ignore_value(self) -> None:
        decision = _decide(_scan({0: 10, 255: 4}))
        assert decision.num_classes == 2
        assert decision.mapping == LabelMapping(2, 255, binary=True)
        assert "read as binary masks" in decision.messages[0]
        with pytest.raises(UsageError, match="class \\[0\\]"):
            _decide(_scan({0: 10, 255: 4}), ignore_index_given=True)
        # Declared as 3 classes, 255 stays the ignore value.
        assert _decide(_scan({0: 10, 255: 4, 1: 2}), num_classes=3).mapping is None


class TestLabelMapping:
    def test_binary_and_unknown_labels(self) -> None:
        labels = np.array([0, 1, 2, 3, 254, 255])
        assert LabelMapping(3, 255)(labels).tolist() == labels.tolist()
        binary = LabelMapping(2, 255, binary=True)(np.array([0, 255, 0]))
        assert binary.tolist() == [0, 1, 0]
        unknown = LabelMapping(3, 255, ignore_unknown=True)(labels)
        assert unknown.tolist() == [0, 1, 2, 255, 255, 255]
        # Another ignore value: it is kept, labels >= 3 become it.
        other = LabelMapping(3, 100, ignore_unknown=True)(np.array([-2, 2, 3, 100]))
        assert other.tolist() == [100, 2, 100, 100]


class TestValidationMasks:
    def test_labels_only_in_validation_masks_count(self, tmp_path: Path) -> None:
        train = _write_pairs(tmp_path / "train", [np.array([[0, 1], [2, 2]])])
        val = _write_pairs(tmp_path / "val", [np.array([[0, 3], [3, 255]])])
        scan = scan_masks(train, "--images", "--masks")
        scan = scan_masks(val, "--val-images", "--val-masks", scan)
        assert scan.pixel_counts == Counter({0: 2, 1: 1, 2: 2, 3: 2, 255: 1})
        assert _decide(scan).num_classes == 4
        # Declared as 3 classes, the validation-only label 3 is outside: the message
        # names the validation option and file.
        with pytest.raises(UsageError) as info:
            _decide(scan, num_classes=3)
        assert info.value.argument == "--val-masks"
        assert str(val[0][1]) in str(info.value.value)
        assert "labels [3] (2 pixels)" in str(info.value)

    def test_stray_value_only_in_validation_masks(self, tmp_path: Path) -> None:
        train = _write_pairs(tmp_path / "train", [np.array([[0, 1], [1, 0]])])
        val = _write_pairs(tmp_path / "val", [np.array([[0, 1], [9, 0]])])
        scan = scan_masks(train, "--images", "--masks")
        scan = scan_masks(val, "--val-images", "--val-masks", scan)
        with pytest.raises(UsageError, match="holds label 9") as info:
            _decide(scan)
        assert info.value.argument == "--val-masks"


class TestScanProblems:
    def test_every_unreadable_image_is_listed_with_its_folder(
        self, tmp_path: Path
    ) -> None:
        samples = _write_pairs(tmp_path / "set", [np.zeros((2, 3))] * 5)
        for image_path, _ in samples[1:]:
            image_path.write_bytes(b"")
        with pytest.raises(UsageError) as info:
            scan_masks(samples, "--images", "--masks")
        assert info.value.argument == "--images"
        assert info.value.value == tmp_path / "set" / "images"
        message = str(info.value)
        assert "4 images cannot be read" in message and "; and 1 more" in message
        for image_path, _ in samples[1:4]:
            assert image_path.name in message

    def test_masks_of_another_size_are_listed(self, tmp_path: Path) -> None:
        samples = _write_pairs(tmp_path / "set", [np.zeros((2, 3))] * 3)
        for _, mask_path in samples[::2]:
            Image.new("L", (2, 3)).save(mask_path)  # rotated: 2 wide, 3 high
        with pytest.raises(UsageError) as info:
            scan_masks(samples, "--val-images", "--val-masks")
        assert info.value.argument == "--val-masks"
        assert info.value.value == tmp_path / "set" / "masks"
        assert info.value.fix == (
            "2 masks differ in size from their images (width x height): "
            "0_mask.png is 2x3, 0.png is 3x2; 2_mask.png is 2x3, 2.png is 3x2; a mask "
            "must label its image pixel for pixel (is it another image's mask, or "
            "rotated?)"
        )

    def test_three_problems_are_listed_without_a_count(self, tmp_path: Path) -> None:
        samples = _write_pairs(tmp_path / "set", [np.zeros((2, 3))] * 4)
        for image_path, _ in samples[1:]:
            image_path.write_bytes(b"")
        with pytest.raises(UsageError) as info:
            scan_masks(samples, "--images", "--masks")
        fix = info.value.fix
        assert fix.startswith("3 images cannot be read: ")
        assert fix.endswith("; replace or remove them (and their masks)")
        assert "more" not in fix and fix.count("; ") == 3
        for image_path, _ in samples[1:]:
            assert image_path.name in fix

    def test_files_holding_a_value_are_kept_up_to_three(self, tmp_path: Path) -> None:
        masks = [np.full((2, 2), 1)] * 4 + [np.full((2, 2), 2)]
        scan = scan_masks(_write_pairs(tmp_path / "set", masks), "-i", "-m")
        assert scan.pixel_counts == Counter({1: 16, 2: 4})
        assert [path.name for _, path in scan.files[1]] == [
            "0_mask.png",
            "1_mask.png",
            "2_mask.png",
        ]
        option, files = scan.where([2, 1])
        assert option == "-m"
        folder = tmp_path / "set" / "masks"
        assert files == (
            f"{folder / '0_mask.png'}, {folder / '1_mask.png'}, "
            f"{folder / '2_mask.png'} and 1 more"
        )
        assert scan.where([7]) == ("--masks", "")
        # Exactly three holders: all shown, no count.
        assert scan.where([1])[1] == (
            f"{folder / '0_mask.png'}, {folder / '1_mask.png'}, {folder / '2_mask.png'}"
        )

    def test_long_label_lists_are_shortened(self) -> None:
        labels = {v: 1 for v in range(12) if v != 5}
        with pytest.raises(UsageError) as info:
            _decide(_scan(labels))
        assert "[0, 1, 2, 3, 4, 6, 7, ..., 11]" in str(info.value)
        labels = {v: 1 for v in range(9) if v != 5}  # 8 labels: all shown
        with pytest.raises(UsageError) as info:
            _decide(_scan(labels))
        assert "[0, 1, 2, 3, 4, 6, 7, 8]" in str(info.value)


class TestClassNamesFile:
    def test_names_next_to_the_mask_folder(self, tmp_path: Path) -> None:
        (tmp_path / "masks").mkdir()
        (tmp_path / "classes.json").write_text(
            '{"class_names": ["background", "cat", 7], "num_classes": 3}'
        )
        assert class_names_file(tmp_path / "masks") == ["background", "cat", "7"]
        assert class_names_file(str(tmp_path / "masks")) == ["background", "cat", "7"]
        # The file belongs one level above the mask folder, not inside it.
        assert class_names_file(tmp_path) is None

    @pytest.mark.parametrize(
        "text",
        [
            None,  # no file
            "{not json",
            '{"names": ["a", "b"]}',
            '["a", "b"]',
            '{"class_names": "ab"}',
        ],
    )
    def test_no_readable_names(self, tmp_path: Path, text: str | None) -> None:
        (tmp_path / "masks").mkdir()
        if text is not None:
            (tmp_path / "classes.json").write_text(text)
        assert class_names_file(tmp_path / "masks") is None


def _refusal(scan: MaskScan, **kwargs: Any) -> UsageError:
    """The error :func:`_decide` raises."""
    with pytest.raises(UsageError) as info:
        _decide(scan, **kwargs)
    return info.value


class TestMessages:
    """The full text of every decision message with the ``eval`` command's options."""

    def test_binary_masks_name_the_holder_of_255(self) -> None:
        scan = _scan({0: 10})
        scan.pixel_counts[255] = 4
        scan.files[255] = [("--val-masks", Path("val_0.png"))]
        decision = _decide(scan)
        assert decision.messages == [
            "--val-masks: the masks hold only 0 and 255: read as binary masks (0 = "
            "background, 255 = class 1); pass --ignore-index 255 to ignore 255 "
            "instead"
        ]

    def test_labels_outside_the_declared_classes(self) -> None:
        error = _refusal(_scan({0: 10, 1: 5, 3: 2}), num_classes=3)
        assert (error.argument, error.value) == ("--masks", "mask_3.png")
        assert error.fix == (
            "labels [3] (2 pixels) lie outside the 3 classes declared by "
            "--num-classes (labels 0..2, 255 = ignore); fix the masks or declare the "
            "right classes with --num-classes (or a classes.json next to the mask "
            "folder), or pass --ignore-unknown-labels to ignore those pixels"
        )
        # A command without the ignore option does not offer it.
        error = _refusal(
            _scan({0: 10, 1: 5, 3: 2}),
            num_classes=3,
            declare_hint="--classes",
            ignore_unknown_hint=None,
        )
        assert error.fix.endswith("declare the right classes with --classes")

    def test_stray_label(self) -> None:
        error = _refusal(_scan({0: 10, 1: 5, 200: 1}))
        assert (error.argument, error.value) == ("--masks", "mask_200.png")
        assert error.fix == (
            "holds label 200 (1 pixels) but the masks' labels [0, 1, 200] are not "
            "0..N (198 values in between never occur); declare the classes with "
            "--num-classes (or a classes.json next to the mask folder) instead of "
            "letting a stray value define them, and pass --ignore-unknown-labels to "
            "ignore labels outside them"
        )

    def test_one_labelled_class_and_only_ignored_pixels(self) -> None:
        error = _refusal(_scan({0: 10, 255: 4}), num_classes=3)
        assert (error.argument, error.value) == ("--masks", "mask_0.png")
        assert error.fix == (
            "every labelled pixel is class [0] (the rest equals --ignore-index 255); "
            "segmentation needs at least two labelled classes"
        )
        error = _refusal(_scan({7: 10}), ignore_index=7, ignore_option="--ignore")
        assert (error.argument, error.value) == ("--ignore", 7)
        assert error.fix == "every mask pixel equals it"

    def test_too_few_declared_classes_name_their_source(self) -> None:
        error = _refusal(
            _scan({0: 10, 1: 5}), num_classes=1, declared_by="classes.json"
        )
        assert (error.argument, error.value) == ("classes.json", 1)


class TestOnePair:
    def test_one_unreadable_image(self, tmp_path: Path) -> None:
        samples = _write_pairs(tmp_path / "set", [np.zeros((2, 3))])
        samples[0][0].write_bytes(b"")
        with pytest.raises(UsageError, match="1 images cannot be read") as info:
            scan_masks(samples, "--images", "--masks")
        assert info.value.value == tmp_path / "set" / "images"

    def test_one_mask_of_another_size(self, tmp_path: Path) -> None:
        samples = _write_pairs(tmp_path / "set", [np.zeros((2, 3))])
        Image.new("L", (2, 3)).save(samples[0][1])
        with pytest.raises(UsageError, match="1 masks differ in size") as info:
            scan_masks(samples, "--images", "--masks")
        assert info.value.value == tmp_path / "set" / "masks"
