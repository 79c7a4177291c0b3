from __future__ import annotations

import numpy as np
import pytest
import torch

from lightly_cotap.eval.metrics import (
    confusion_matrix,
    greedy_match,
    hungarian_match,
    iou_matrix,
    matched_metrics,
    metrics_from_confusion,
    remap_confusion,
    segmentation_metrics,
)

# Hand-made 2x4 maps: class 0 has TP=3, FP=0, FN=1 (IoU 3/4); class 1 has TP=4, FP=1,
# FN=0 (IoU 4/5); 7 of 8 pixels correct.
TARGET = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
PRED = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])


def _reference_ious(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int
) -> list[float]:
    valid = target != ignore
    out = []
    for c in range(num_classes):
        p = (pred == c) & valid
        t = (target == c) & valid
        union = (p | t).sum()
        out.append(float((p & t).sum() / union) if union > 0 else 0.0)
    return out


def test_perfect_prediction() -> None:
    target = torch.randint(
        0, 5, (3, 17, 19), generator=torch.Generator().manual_seed(0)
    )
    result = segmentation_metrics(target.clone(), target, 5)
    assert result["miou"] == pytest.approx(1.0)
    assert result["pixel_accuracy"] == pytest.approx(1.0)
    assert result["iou_per_class"] == pytest.approx([1.0] * 5)


def test_hand_made_values() -> None:
    result = segmentation_metrics(PRED, TARGET, 2)
    assert result["iou_per_class"] == pytest.approx([3 / 4, 4 / 5])
    assert result["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert result["pixel_accuracy"] == pytest.approx(7 / 8)
    assert torch.equal(
        confusion_matrix(PRED, TARGET, 2), torch.tensor([[3, 1], [0, 4]])
    )


def test_ignore_index_pixels_are_not_scored() -> None:
    # Append a column labelled 255 whose predictions are all wrong: nothing changes.
    target = torch.cat([TARGET, torch.full((2, 1), 255)], dim=1)
    pred = torch.cat([PRED, torch.tensor([[1], [0]])], dim=1)
    result = segmentation_metrics(pred, target, 2, ignore_index=255)
    assert result["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert result["pixel_accuracy"] == pytest.approx(7 / 8)
    # Another ignore value works too.
    target[target == 255] = 9
    assert segmentation_metrics(pred, target, 2, ignore_index=9)[
        "miou"
    ] == pytest.approx((3 / 4 + 4 / 5) / 2)


def test_absent_classes_zero_or_excluded() -> None:
    # Class 2 absent from ground truth and prediction.
    zero = segmentation_metrics(PRED, TARGET, 3, absent_classes="zero")
    excl = segmentation_metrics(PRED, TARGET, 3, absent_classes="exclude")
    assert zero["miou"] == pytest.approx((3 / 4 + 4 / 5 + 0.0) / 3)
    assert excl["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert zero["num_present_classes"] == excl["num_present_classes"] == 2
    assert np.isnan(excl["iou_per_class"][2])  # type: ignore[index]
    # A class absent from the ground truth but predicted scores 0 in both modes.
    pred = PRED.clone()
    pred[0, 0] = 2  # class 0: TP 2, FN 2 -> 2/4; class 2: FP 1 -> 0
    for mode in ("zero", "exclude"):
        res = segmentation_metrics(pred, TARGET, 3, absent_classes=mode)  # type: ignore[arg-type]
        assert res["iou_per_class"] == pytest.approx([2 / 4, 4 / 5, 0.0])
        assert res["miou"] == pytest.approx((2 / 4 + 4 / 5) / 3)


def test_random_maps_match_reference() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 6, (4, 23, 31), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, 6, (4, 23, 31), generator=g)
    result = segmentation_metrics(pred, target, 6)
    ref = _reference_ious(pred.numpy(), target.numpy(), 6, 255)
    assert result["iou_per_class"] == pytest.approx(ref)
    assert result["miou"] == pytest.approx(np.mean(ref))
    valid = target != 255
    acc = float((pred[valid] == target[valid]).float().mean())
    assert result["pixel_accuracy"] == pytest.approx(acc)


def test_hungarian_recovers_permuted_labels() -> None:
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 5, (2, 20, 20), generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])  # class c is predicted as cluster perm[c]
    clusters = perm[target]
    conf = confusion_matrix(clusters, target, 5)
    mapping = hungarian_match(conf)
    assert torch.equal(mapping[perm], torch.arange(5))
    result = matched_metrics(conf, matching="hungarian")
    assert result["miou"] == pytest.approx(1.0)
    # Without matching, the permuted labels score (almost) nothing.
    assert segmentation_metrics(clusters, target, 5)["miou"] < 0.1


def test_hungarian_with_more_clusters_maps_unmatched_to_background() -> None:
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    clusters = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    conf = confusion_matrix(clusters, target, 2, num_pred_classes=4)
    mapping = hungarian_match(conf, unmatched_label=0)
    assert (mapping == 1).sum() == 1 and (mapping == 0).sum() == 3
    # One cluster of class 1 is matched, the other becomes background:
    # class 0: TP 4, FP 2 -> 4/6; class 1: TP 2, FN 2 -> 2/4.
    result = matched_metrics(conf, matching="hungarian")
    assert result["miou"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    # Greedy many-to-one merges the split clusters back.
    greedy = matched_metrics(conf, matching="greedy")
    assert greedy["miou"] == pytest.approx(1.0)
    assert greedy["mapping"] == [0, 0, 1, 1]


def test_greedy_iou_versus_precision() -> None:
    # class 0 has 11 px, class 1 has 2 px; cluster 0 = 8 px of class 0, cluster 1 =
    # 3 px of class 0 + 2 px of class 1. IoU(c1, class 0) = 3/13 < IoU(c1, class 1)
    # = 2/5, but cluster 1's precision is highest for class 0 (3 > 2).
    target = torch.tensor([0] * 11 + [1] * 2)
    clusters = torch.tensor([0] * 8 + [1] * 3 + [1] * 2)
    conf = confusion_matrix(clusters, target, 2)
    assert iou_matrix(conf)[:, 1].tolist() == pytest.approx([3 / 13, 2 / 5])
    assert greedy_match(conf, precision_based=False).tolist() == [0, 1]
    assert greedy_match(conf, precision_based=True).tolist() == [0, 0]
    assert greedy_match(conf).tolist() == [0, 0]  # precision is the default


def test_remap_confusion_equals_relabelled_predictions() -> None:
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 3, (500,), generator=g)
    clusters = torch.randint(0, 7, (500,), generator=g)
    mapping = torch.randint(0, 3, (7,), generator=g)
    conf = confusion_matrix(clusters, target, 3, num_pred_classes=7)
    expected = confusion_matrix(mapping[clusters], target, 3)
    assert torch.equal(remap_confusion(conf, mapping, 3), expected)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(PRED, TARGET[:, :3], 2)
    with pytest.raises(ValueError, match="target labels"):
        confusion_matrix(PRED, TARGET + 1, 2)
    with pytest.raises(ValueError, match="pred labels"):
        confusion_matrix(PRED + 5, TARGET, 2)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(PRED.float(), TARGET, 2)
    with pytest.raises(ValueError, match="square"):
        metrics_from_confusion(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="absent_classes"):
        metrics_from_confusion(torch.zeros(2, 2), absent_classes="nan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="matching"):
        matched_metrics(torch.ones(2, 2), matching="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unmatched_label"):
        hungarian_match(torch.ones(2, 3), unmatched_label=2)


def test_all_pixels_ignored_gives_zero() -> None:
    target = torch.full((4, 4), 255)
    result = segmentation_metrics(torch.zeros(4, 4, dtype=torch.long), target, 3)
    assert result["miou"] == 0.0
    assert result["pixel_accuracy"] == 0.0
    assert result["num_present_classes"] == 0


def test_label_edges_of_confusion_matrix() -> None:
    target = torch.tensor([0, 1, 2, 255, 2])
    pred = torch.tensor([0, 2, 2, 0, 1])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]  # 255 not counted
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 3\)"):
        confusion_matrix(pred, torch.tensor([0, 1, 3, 255, 2]), 3)  # label == C
    with pytest.raises(ValueError, match=r"target labels.*\[-1, 2\]"):
        confusion_matrix(pred, torch.tensor([0, 1, -1, 255, 2]), 3)
    with pytest.raises(ValueError, match=r"pred labels must lie in \[0, 3\)"):
        confusion_matrix(torch.tensor([0, 1, 3, 0, 1]), target, 3)  # pred == K
    # Another ignore value: 255 is then an ordinary (out-of-range) label.
    with pytest.raises(ValueError, match="target labels"):
        confusion_matrix(pred, target, 3, ignore_index=-1)
    shifted = confusion_matrix(pred, torch.tensor([0, 1, 2, -1, 2]), 3, ignore_index=-1)
    assert torch.equal(shifted, conf)
    # The prediction of an ignored pixel is not checked (nor counted).
    assert torch.equal(confusion_matrix(torch.tensor([0, 2, 2, 7, 1]), target, 3), conf)


def test_class_counts_must_be_positive() -> None:
    target = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="must be positive, got 0 and 0"):
        confusion_matrix(target, target, 0)
    with pytest.raises(ValueError, match="must be positive, got 1 and 0"):
        confusion_matrix(target, target, 1, num_pred_classes=0)
    with pytest.raises(ValueError, match="must be positive, got 0 and 3"):
        confusion_matrix(target, target, 0, num_pred_classes=3)
    # One class (or one cluster) is a valid count.
    assert confusion_matrix(target, target, 1).tolist() == [[3]]
    assert confusion_matrix(target, target, 2, num_pred_classes=1).tolist() == [
        [3],
        [0],
    ]


def test_single_pixel_is_checked_and_scored() -> None:
    with pytest.raises(ValueError, match="target labels"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="pred labels"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
    # A class of one pixel, found: IoU 1 (union 1), pixel accuracy 1.
    conf = confusion_matrix(torch.tensor([0]), torch.tensor([0]), 2)
    assert iou_matrix(conf).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    result = metrics_from_confusion(conf)
    assert result["iou_per_class"] == [1.0, 0.0]
    assert result["pixel_accuracy"] == 1.0


def test_defaults_follow_leopart() -> None:
    conf = confusion_matrix(PRED, TARGET, 3)
    # Absent classes count as 0 by default.
    assert metrics_from_confusion(conf)["miou"] == pytest.approx((3 / 4 + 4 / 5) / 3)
    # Nothing present: mIoU 0, not NaN, in both conventions.
    empty = torch.zeros(3, 3, dtype=torch.long)
    for mode in ("zero", "exclude"):
        result = metrics_from_confusion(empty, absent_classes=mode)  # type: ignore[arg-type]
        assert result["miou"] == 0.0 and result["pixel_accuracy"] == 0.0
    assert matched_metrics(conf, absent_classes="exclude")["miou"] == pytest.approx(
        (3 / 4 + 4 / 5) / 2
    )


def test_matched_metrics_defaults_and_options() -> None:
    # 2 classes, 4 clusters: cluster 2 holds 3 px of class 0 and 2 px of class 1.
    conf = torch.tensor([[4, 0, 3, 0], [0, 4, 2, 1]])
    hungarian = matched_metrics(conf)  # Hungarian, unmatched clusters -> class 0
    assert hungarian["mapping"] == hungarian_match(conf, unmatched_label=0).tolist()
    assert hungarian["mapping"] == [0, 1, 0, 0]
    assert hungarian_match(conf).tolist() == [0, 1, 0, 0]
    assert matched_metrics(conf, unmatched_label=1)["mapping"] == [0, 1, 1, 1]
    # Greedy: cluster 1 holds 3 px of class 0 (11 px) and 2 px of class 1 (2 px):
    # by precision (default) it goes to class 0, by IoU (2/5 > 3/13) to class 1.
    conf = torch.tensor([[8, 3], [0, 2]])
    assert matched_metrics(conf, matching="greedy")["mapping"] == [0, 0]
    by_iou = matched_metrics(conf, matching="greedy", precision_based=False)
    assert by_iou["mapping"] == [0, 1]


def test_matching_needs_a_2d_confusion_matrix() -> None:
    for match in (hungarian_match, greedy_match):
        with pytest.raises(
            ValueError, match=r"conf must have shape \(C, K\), got \(4,\)"
        ):
            match(torch.ones(4))
    with pytest.raises(ValueError, match=r"mapping must have shape \(3,\), got \(2,\)"):
        remap_confusion(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), 2)
