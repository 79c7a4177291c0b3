"""The ``--data`` folder of ``lightly-cotap mmseg-config``: layout and classes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lightly_cotap.data.segmentation_folder import SegmentationFolder
from lightly_cotap.eval.mask_labels import MaskScan, decide_classes, scan_masks
from lightly_cotap.user_errors import UsageError

#: Mask value that is not scored (mmseg's default ignore_index).
IGNORE_INDEX = 255
SPLITS = ("train", "val")


class MMSegConfigError(ValueError):
    """A user error of ``mmseg-config`` (bad folder, checkpoint or option).

    The command line prints its message and exits with code 2.
    """


@dataclass
class DataSummary:
    """What ``--data`` holds.

    Attributes:
        root: The absolute data folder.
        num_images: Images per split.
        img_suffix: File suffix of the images (e.g. ".jpg").
        seg_map_suffix: File suffix of the masks (e.g. ".png").
        class_names: One name per class id.
        class_source: Where the names come from (for the user).
    """

    root: Path
    num_images: dict[str, int]
    img_suffix: str
    seg_map_suffix: str
    class_names: list[str]
    class_source: str


def scan_data(root: str | os.PathLike[str]) -> DataSummary:
    """Checks the layout of ``--data`` and finds the suffixes and classes.

    Every mask is read once by the evaluation's scanner
    (:func:`~lightly_cotap.eval.mask_labels.scan_masks`: single-channel, the size of
    its image) and the classes are fixed by
    :func:`~lightly_cotap.eval.mask_labels.decide_classes`: declared by a
    ``classes.json`` in ``--data``, else inferred only from gap-free labels
    ``0..N`` (one stray value is an error, not extra classes). ``255`` is always
    ignored, as in the configs.

    Args:
        root: The data folder.

    Returns:
        The summary.

    Raises:
        MMSegConfigError: If a folder is missing, an image has no mask or does not
            decode, the suffixes are mixed, a mask is not single-channel or not the
            size of its image, or the classes do not fit the masks.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise MMSegConfigError(f"--data {str(root)!r} is not a folder.")
    num_images: dict[str, int] = {}
    img_suffixes: set[str] = set()
    mask_suffixes: set[str] = set()
    scan: MaskScan | None = None
    for split in SPLITS:
        try:
            folder = SegmentationFolder(
                root / "images" / split, root / "masks" / split, image_size=None
            )
        except ValueError as ex:
            raise MMSegConfigError(
                f"--data {str(root)!r} needs images/{split} and masks/{split} with "
                f"one mask per image: {ex}"
            ) from ex
        num_images[split] = len(folder.samples)
        img_suffixes |= {image.suffix for image, _ in folder.samples}
        mask_suffixes |= {mask.suffix for _, mask in folder.samples}
        try:
            scan = scan_masks(folder.samples, "--data", "--data", scan)
        except UsageError as ex:
            raise MMSegConfigError(str(ex)) from ex
    for kind, suffixes in (("images", img_suffixes), ("masks", mask_suffixes)):
        if len(suffixes) > 1:
            raise MMSegConfigError(
                f"the {kind} of --data have the suffixes {sorted(suffixes)}; mmseg "
                "reads one suffix per folder: convert them to one format."
            )
    assert scan is not None
    if not scan.values - {IGNORE_INDEX}:
        raise MMSegConfigError(
            f"every mask pixel of --data is {IGNORE_INDEX} (ignored): no classes."
        )
    names_file = root / "classes.json"
    names = _class_names_file(names_file) if names_file.is_file() else None
    try:
        decision = decide_classes(
            scan,
            num_classes=None if names is None else len(names),
            declared_by=str(names_file),
            ignore_index=IGNORE_INDEX,
            ignore_index_given=True,  # the configs always ignore 255
            ignore_unknown=False,  # the configs read the raw mask values
            declare_hint=f"a {names_file.name} in --data",
            ignore_unknown_hint=None,
            ignore_option="the ignore value",
        )
    except UsageError as ex:
        raise MMSegConfigError(str(ex)) from ex
    if names is not None:
        source = f"{names_file.name} ({len(names)} names)"
    else:
        names = [str(c) for c in range(decision.num_classes)]
        source = f"the mask values {_ranges(sorted(scan.values - {IGNORE_INDEX}))}"
    return DataSummary(
        root=root,
        num_images=num_images,
        img_suffix=img_suffixes.pop(),
        seg_map_suffix=mask_suffixes.pop(),
        class_names=names,
        class_source=source,
    )


def _class_names_file(path: Path) -> list[str]:
    """The class names of a ``classes.json``: a list or ``{"class_names": [...]}``."""
    try:
        content = json.loads(path.read_text())
    except ValueError as ex:
        raise MMSegConfigError(f"{str(path)!r} is not valid JSON: {ex}") from ex
    names = content.get("class_names") if isinstance(content, dict) else content
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MMSegConfigError(
            f"{str(path)!r} must hold a list of class names or "
            '{"class_names": [...]}.'
        )
    return list(names)


def _ranges(values: list[int]) -> str:
    """'0-3, 7' for [0, 1, 2, 3, 7]."""
    parts: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)
