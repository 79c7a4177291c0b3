"""Prepares the Tux Paint copy-paste segmentation set (train / test image + mask folders).

Steps (each skipped when its output already exists):

1. ``apt-get download`` the Debian packages ``tuxpaint-stamps-default``,
   ``mate-backgrounds`` and ``plasma-workspace-wallpapers`` into ``CACHE/debs`` and
   unpack them with ``dpkg -x`` into ``CACHE/root`` (no system install, no root
   needed; the 184 MB of Tux Paint sounds and, unless ``--keep-debs``, the 288 MB of
   .deb files are deleted afterwards);
2. build ``CACHE/objects/<class>/*.png`` (the 7 classes of ``TUXPAINT_CLASSES`` and
   the photo filter of ``is_photo_cutout``) and ``CACHE/backgrounds/*.jpg`` (21
   photos);
3. write ``OUT/train`` and ``OUT/test`` with ``images/`` and ``masks/`` folders
   (PNG masks: 0 = background, 1..7 = classes), with disjoint objects and
   backgrounds.

Usage:
    python benchmarks/prepare_copy_paste_scenes.py --train 500 --test 200
    # -> ~/.cache/lightly_cotap/copy_paste_scenes/{train,test}/{images,masks}

Without apt (not Debian / no network) pass your own ``--objects`` (class folders of
RGBA PNGs) and ``--backgrounds`` (photos) folders. The stamps and wallpapers are GPL /
LGPL / CC-BY-SA: they are fetched at setup time and never committed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lightly_cotap.data.copy_paste_scenes import CopyPasteScenes
from lightly_cotap.data.copy_paste_sources import (
    TUXPAINT_CLASSES,
    debian_backgrounds,
    tuxpaint_class_folders,
)

PACKAGES = (
    "tuxpaint-stamps-default",
    "mate-backgrounds",
    "plasma-workspace-wallpapers",
)


def _du(path: Path) -> str:
    total = sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()
    )
    return f"{total / 1e6:.1f} MB"


def fetch_debian_packages(cache: Path, apt_update: bool, keep_debs: bool) -> Path:
    """Downloads and unpacks the Debian packages; returns the ``dpkg -x`` root.

    Exits with a clear message when apt-get / dpkg are missing or the download fails.
    """
    root = cache / "root"
    if (root / "usr/share/tuxpaint/stamps").is_dir():
        print(f"[skip] packages already unpacked in {root}")
        return root
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            sys.exit(
                f"error: '{tool}' not found. This step needs a Debian/Ubuntu system "
                "with apt. Pass --objects and --backgrounds folders instead."
            )
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if apt_update:
        print("apt-get update ...")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["apt-get", "download", *PACKAGES], cwd=debs, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(
            "error: 'apt-get download' failed:\n"
            f"{proc.stderr.strip()}\n"
            "If the packages are unknown, run with --apt-update (needs root) or check "
            "that a Debian bookworm 'main' source is configured; without network pass "
            "--objects and --backgrounds folders instead."
        )
    print(
        f"downloaded {len(PACKAGES)} packages ({_du(debs)}) in {time.perf_counter() - t0:.1f}s"
    )
    t0 = time.perf_counter()
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    for ogg in root.rglob("*.ogg"):
        ogg.unlink()
    if not keep_debs:
        shutil.rmtree(debs)
    print(f"unpacked to {root} ({_du(root)}) in {time.perf_counter() - t0:.1f}s")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path.home() / ".cache/lightly_cotap/copy_paste_scenes",
        help="output folder of the train/ and test/ splits",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache/lightly_cotap/debian",
        help="download / unpack folder of the Debian packages",
    )
    parser.add_argument("--objects", type=Path, help="class folders of RGBA cut-outs")
    parser.add_argument("--backgrounds", type=Path, help="folder of background photos")
    parser.add_argument("--train", type=int, default=500, help="training scenes")
    parser.add_argument("--test", type=int, default=200, help="test scenes")
    parser.add_argument("--size", type=int, default=224, help="scene side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    parser.add_argument(
        "--apt-update", action="store_true", help="run apt-get update first"
    )
    parser.add_argument(
        "--keep-debs",
        action="store_true",
        help="keep the downloaded .deb files (288 MB)",
    )
    args = parser.parse_args()

    start = time.perf_counter()
    if (args.objects is None) != (args.backgrounds is None):
        parser.error("pass both --objects and --backgrounds, or neither")
    if args.objects is None:
        root = fetch_debian_packages(args.cache, args.apt_update, args.keep_debs)
        objects = args.cache / "objects"
        backgrounds = args.cache / "backgrounds"
        if not objects.is_dir():
            t0 = time.perf_counter()
            counts = tuxpaint_class_folders(root / "usr/share/tuxpaint/stamps", objects)
            print(
                f"objects: {counts} (total {sum(counts.values())}) in {time.perf_counter() - t0:.1f}s"
            )
        if not backgrounds.is_dir():
            photos = debian_backgrounds(root, backgrounds)
            print(f"backgrounds: {len(photos)} photos")
        classes: list[str] | None = list(TUXPAINT_CLASSES)
    else:
        objects, backgrounds = args.objects, args.backgrounds
        folders = {p.name for p in objects.iterdir() if p.is_dir()}
        # Keep the Tux Paint label order when the folders are the Tux Paint classes.
        classes = list(TUXPAINT_CLASSES) if folders == set(TUXPAINT_CLASSES) else None

    for split, num, seed in (
        ("train", args.train, args.seed),
        ("test", args.test, args.seed + 1),
    ):
        t0 = time.perf_counter()
        dataset = CopyPasteScenes(
            objects,
            backgrounds,
            split=split,  # type: ignore[arg-type]
            num_samples=num,
            image_size=args.size,
            classes=classes,
            seed=seed,
        )
        out = dataset.save(args.out / split, image_format=args.image_format)
        print(
            f"{split}: {num} scenes, {sum(len(v) for v in dataset.objects.values())} "
            f"objects, {len(dataset.backgrounds)} backgrounds -> {out} ({_du(out)}) in "
            f"{time.perf_counter() - t0:.1f}s"
        )
    print(f"classes: {dataset.class_names}")
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
