"""The label values of an evaluation's masks and the classes they define.

Every mask is read once before any feature is computed: its mode, its size against
its image's and its label values. :func:`decide_classes` then fixes the number of
classes without guessing from stray values:

- declared classes (``--num-classes`` or a ``classes.json`` next to the mask
  folder) are checked: labels outside them are an error naming the values and the
  files, or are ignored (``ignore_unknown``) with a count;
- undeclared classes are inferred only from a gap-free label set ``0..max``; one
  stray value (e.g. a pixel labelled 200) is an error instead of 201 classes;
- masks holding only 0 and 255 are binary masks (255 = class 1), unless the ignore
  index was set explicitly.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lightly_cotap.data.image_io import image_problem
from lightly_cotap.data.segmentation_folder import MASK_MODES
from lightly_cotap.user_errors import UsageError

#: Files named per problem in a message.
_MAX_FILES_SHOWN = 3


@dataclass
class MaskScan:
    """Label values found in mask folders.

    Attributes:
        pixel_counts: Pixels per label value, over all masks.
        files: Per label value, ``(option, mask path)`` of the first masks holding it.
    """

    pixel_counts: Counter[int] = field(default_factory=Counter)
    files: dict[int, list[tuple[str, Path]]] = field(default_factory=dict)

    @property
    def values(self) -> set[int]:
        """Every label value found."""
        return set(self.pixel_counts)

    def where(self, values: Sequence[int]) -> tuple[str, str]:
        """The option and a short list of files holding some of ``values``.

        Args:
            values: Label values.

        Returns:
            ``(option, files)``: the option that named the first holder's folder and
            up to three holders, comma-separated (with a count of the others).
        """
        found = [f for v in values for f in self.files.get(v, [])]
        option = found[0][0] if found else "--masks"
        names = sorted({str(path) for _, path in found})
        shown = ", ".join(names[:_MAX_FILES_SHOWN])
        more = len(names) - _MAX_FILES_SHOWN
        return option, shown + (f" and {more} more" if more > 0 else "")


def _listing(problems: list[str]) -> str:
    shown = "; ".join(problems[:_MAX_FILES_SHOWN])
    more = len(problems) - _MAX_FILES_SHOWN
    return shown + (f"; and {more} more" if more > 0 else "")


def scan_masks(
    samples: Sequence[tuple[Path, Path]],
    images_option: str,
    masks_option: str,
    scan: MaskScan | None = None,
) -> MaskScan:
    """Reads every ``(image, mask)`` pair once and collects the mask labels.

    Args:
        samples: ``(image path, mask path)`` pairs (``SegmentationFolder.samples``).
        images_option: Option that named the image folder (for messages).
        masks_option: Option that named the mask folder.
        scan: A scan to add to (e.g. of the training folders).

    Returns:
        The scan.

    Raises:
        UsageError: If an image does not decode, a mask is not a single-channel
            image of class ids, or a mask's size differs from its image's.
    """
    scan = MaskScan() if scan is None else scan
    unreadable: list[str] = []
    wrong_size: list[str] = []
    for image_path, mask_path in samples:
        problem = image_problem(image_path)
        if problem is not None:
            unreadable.append(problem)
            continue
        with Image.open(image_path) as image:
            image_size = image.size
        try:
            with Image.open(mask_path) as mask:
                if mask.mode not in MASK_MODES:
                    raise UsageError(
                        masks_option,
                        mask_path,
                        f"is a {mask.mode} image; masks must be single-channel images "
                        "of class ids (or palette PNGs)",
                    )
                if mask.size != image_size:
                    wrong_size.append(
                        f"{mask_path.name} is {mask.size[0]}x{mask.size[1]}, "
                        f"{image_path.name} is {image_size[0]}x{image_size[1]}"
                    )
                    continue
                values, counts = np.unique(np.asarray(mask), return_counts=True)
        except (UnidentifiedImageError, OSError) as ex:
            raise UsageError(
                masks_option, mask_path, f"cannot be read as a mask ({ex})"
            ) from ex
        for value, count in zip(values.tolist(), counts.tolist()):
            scan.pixel_counts[int(value)] += int(count)
            holders = scan.files.setdefault(int(value), [])
            if len(holders) < _MAX_FILES_SHOWN:
                holders.append((masks_option, mask_path))
    if unreadable:
        folder = samples[0][0].parent
        raise UsageError(
            images_option,
            folder,
            f"{len(unreadable)} images cannot be read: {_listing(unreadable)}; "
            "replace or remove them (and their masks)",
        )
    if wrong_size:
        folder = samples[0][1].parent
        raise UsageError(
            masks_option,
            folder,
            f"{len(wrong_size)} masks differ in size from their images "
            f"(width x height): {_listing(wrong_size)}; a mask must label its "
            "image pixel for pixel (is it another image's mask, or rotated?)",
        )
    return scan


def class_names_file(masks: str | Path) -> list[str] | None:
    """Class names from a ``classes.json`` next to a mask folder.

    ``CopyPasteScenes.save`` writes ``{"class_names": [...], ...}`` one level above
    its ``masks`` folder.

    Args:
        masks: The mask folder.

    Returns:
        The names, or ``None`` without a readable file.
    """
    try:
        names = json.loads((Path(masks).parent / "classes.json").read_text())[
            "class_names"
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


@dataclass(frozen=True)
class LabelMapping:
    """Maps raw mask values to evaluation labels (picklable for DataLoader workers).

    Attributes:
        num_classes: Classes of the evaluation.
        ignore_index: Label of ignored pixels.
        binary: Read 0/255 masks as 0/1.
        ignore_unknown: Set labels outside ``[0, num_classes)`` to ``ignore_index``.
    """

    num_classes: int
    ignore_index: int
    binary: bool = False
    ignore_unknown: bool = False

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        """Maps one label array (any shape, integer)."""
        if self.binary:
            mask = np.where(mask == 255, 1, mask)
        if self.ignore_unknown:
            unknown = ((mask < 0) | (mask >= self.num_classes)) & (
                mask != self.ignore_index
            )
            mask = np.where(unknown, self.ignore_index, mask)
        return mask


@dataclass
class ClassDecision:
    """The classes of an evaluation and how masks are mapped onto them.

    Attributes:
        num_classes: Number of classes (incl. background).
        mapping: Mapping for :class:`~lightly_cotap.data.SegmentationFolder`, or
            ``None`` when the raw values are used.
        messages: What was decided that the user should know.
    """

    num_classes: int
    mapping: LabelMapping | None
    messages: list[str]


def decide_classes(
    scan: MaskScan,
    *,
    num_classes: int | None,
    declared_by: str,
    ignore_index: int,
    ignore_index_given: bool,
    ignore_unknown: bool,
    declare_hint: str = "--num-classes (or a classes.json next to the mask folder)",
    ignore_unknown_hint: str | None = "--ignore-unknown-labels",
    ignore_option: str = "--ignore-index",
) -> ClassDecision:
    """Fixes the number of classes from the declared classes and the mask labels.

    Args:
        scan: The labels of every mask (:func:`scan_masks`).
        num_classes: Declared number of classes, or ``None``.
        declared_by: Where ``num_classes`` came from (for messages), e.g.
            ``"--num-classes"`` or the path of a ``classes.json``.
        ignore_index: Label of ignored pixels.
        ignore_index_given: Whether the ignore index was set explicitly (then 0/255
            masks are not read as binary).
        ignore_unknown: Ignore labels outside the declared classes (with a count)
            instead of refusing them.
        declare_hint: How the user declares the classes (for messages).
        ignore_unknown_hint: The option that ignores unknown labels (for
            messages), or ``None`` where the command has none.
        ignore_option: The option that sets the ignore index (for messages).

    Returns:
        The decision.

    Raises:
        UsageError: If labels lie outside the declared classes, undeclared labels
            have gaps, or fewer than two classes are labelled.
    """
    messages: list[str] = []
    values = scan.values
    binary = (
        values == {0, 255}
        and not ignore_index_given
        and num_classes in (None, 2)
        and ignore_index == 255
    )
    if binary:
        option, files = scan.where([255])
        messages.append(
            f"{option}: the masks hold only 0 and 255: read as binary masks (0 = "
            f"background, 255 = class 1); pass {ignore_option} 255 to ignore 255 "
            "instead"
        )
        values = {0, 1}
    labels = values - {ignore_index}
    or_ignore = and_ignore = ""
    if ignore_unknown_hint:
        or_ignore = f", or pass {ignore_unknown_hint} to ignore those pixels"
        and_ignore = f", and pass {ignore_unknown_hint} to ignore labels outside them"
    if num_classes is not None and num_classes < 2:
        raise UsageError(declared_by, num_classes, "must be at least 2 classes")
    if num_classes is not None:
        unknown = sorted(v for v in labels if v < 0 or v >= num_classes)
        if unknown and not ignore_unknown:
            option, files = scan.where(unknown)
            raise UsageError(
                option,
                files,
                f"labels {unknown} ({sum(scan.pixel_counts[v] for v in unknown)} "
                f"pixels) lie outside the {num_classes} classes declared by "
                f"{declared_by} (labels 0..{num_classes - 1}, {ignore_index} = "
                f"ignore); fix the masks or declare the right classes with "
                f"{declare_hint}{or_ignore}",
            )
        if unknown:
            option, files = scan.where(unknown)
            messages.append(
                f"{option}: ignoring {sum(scan.pixel_counts[v] for v in unknown)} "
                f"pixels with labels {unknown} outside the {num_classes} classes "
                f"(in {files})"
            )
            labels -= set(unknown)
    else:
        if not labels:
            raise UsageError(ignore_option, ignore_index, "every mask pixel equals it")
        missing = sorted(set(range(max(labels) + 1)) - labels)
        if min(labels) < 0 or missing:
            stray = max(labels) if missing else min(labels)
            option, files = scan.where([stray])
            raise UsageError(
                option,
                files,
                f"holds label {stray} ({scan.pixel_counts[stray]} pixels) but the "
                f"masks' labels {_short(sorted(labels))} are not 0..N "
                f"({len(missing)} values in between never occur); "
                f"declare the classes with {declare_hint} instead of letting a "
                f"stray value define them{and_ignore}",
            )
        num_classes = max(labels) + 1
    if len(labels) < 2:
        option, files = scan.where(sorted(labels))
        raise UsageError(
            option,
            files,
            f"every labelled pixel is class {sorted(labels)} (the rest equals "
            f"{ignore_option} {ignore_index}); segmentation needs at least two "
            "labelled classes",
        )
    mapping = None
    if binary or ignore_unknown:
        mapping = LabelMapping(
            num_classes, ignore_index, binary=binary, ignore_unknown=ignore_unknown
        )
    return ClassDecision(num_classes, mapping, messages)


def _short(values: list[int], max_shown: int = 8) -> str:
    if len(values) <= max_shown:
        return str(values)
    return f"[{', '.join(map(str, values[: max_shown - 1]))}, ..., {values[-1]}]"
