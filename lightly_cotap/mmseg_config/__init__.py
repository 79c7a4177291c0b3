"""The ``lightly-cotap mmseg-config`` command: an mmseg config for your data.

Usage::

    lightly-cotap mmseg-config --data my_seg --checkpoint cotap_run/backbone.pth \\
        --head fcn --iters 4000 --crop 256 --output my_fcn.py
    python $MMSEG_TOOLS/train.py my_fcn.py

``--data`` holds ``images/{train,val}`` and ``masks/{train,val}`` (masks: single-
channel PNGs of class ids paired with the images by file name, 255 = ignore) and
optionally ``classes.json`` (``{"class_names": [...]}`` or a list). The written
config inherits the model, runtime and schedule of ``mmseg_configs/_base_`` and
states everything it changes: the exported architecture (name, timm overrides,
filter, head widths), the data (classes, crop in every place that needs it), the
machine (data workers, batch size for CPU or GPU) and the schedule (``--iters``
sets max_iters, warm-up, validation and checkpoint intervals). mmseg's own
``tools/train.py`` trains it and logs the validation mIoU.

This package does not import mmsegmentation (the ``lightly-cotap`` parser stays
light); only the final check of the written config does. Modules: ``data`` (the
folder), ``render`` (the config text), ``command`` (options and run).
"""

from lightly_cotap.mmseg_config.command import (
    add_mmseg_config_arguments,
    run_mmseg_config,
    run_mmseg_config_command,
)
from lightly_cotap.mmseg_config.data import DataSummary, MMSegConfigError, scan_data
from lightly_cotap.mmseg_config.render import level_indices, render_config

__all__ = [
    "DataSummary",
    "MMSegConfigError",
    "add_mmseg_config_arguments",
    "level_indices",
    "render_config",
    "run_mmseg_config",
    "run_mmseg_config_command",
    "scan_data",
]
