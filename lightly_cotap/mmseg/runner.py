"""mmengine runner that leaves out the messages which do not concern a run."""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from mmengine.logging import MMLogger
from mmengine.runner import Runner
from mmseg.registry import RUNNERS

#: Python warnings of mmseg that every run of these configs triggers, as
#: ``(module, message start, why it does not concern the run)``.
IRRELEVANT_WARNINGS: tuple[tuple[str, str, str], ...] = (
    (
        "mmseg.models.builder",
        "``build_loss`` would be deprecated soon",
        "mmseg's own decode heads call its deprecated builder",
    ),
    (
        "mmseg.models.losses.cross_entropy_loss",
        "Default ``avg_non_ignore`` is False",
        "the configs keep mmseg's loss averaging, as its published results do",
    ),
    (
        "mmseg.engine.hooks.visualization_hook",
        "The draw is False",
        "the hook draws only for tools/test.py --show / --show-dir, which enable it",
    ),
)

#: mmengine log warnings of every run, as ``(message start, why)``.
IRRELEVANT_LOG_MESSAGES: tuple[tuple[str, str], ...] = (
    (
        "The prefix is not set in metric class IoUMetric",
        "mmseg's metric has no prefix by design; the metrics stay 'mIoU', 'aAcc'",
    ),
    (
        '"FileClient" will be deprecated in future',
        "mmengine's checkpoint and logger hooks create one unconditionally",
    ),
    (
        '"HardDiskBackend" is the alias of "LocalBackend"',
        "the same FileClient of mmengine's hooks",
    ),
)


class IrrelevantLogFilter(logging.Filter):
    """Drops the warnings of :data:`IRRELEVANT_LOG_MESSAGES` from a logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to keep a record.

        Args:
            record: A log record.

        Returns:
            False for a warning that starts with a listed message.
        """
        if record.levelno != logging.WARNING:
            return True
        message = record.getMessage()
        return not any(message.startswith(m) for m, _ in IRRELEVANT_LOG_MESSAGES)


def ignore_irrelevant_warnings() -> None:
    """Ignores the Python warnings of :data:`IRRELEVANT_WARNINGS` (only those)."""
    for module, message, _ in IRRELEVANT_WARNINGS:
        warnings.filterwarnings(
            "ignore",
            message=re.escape(message),
            category=UserWarning,
            module=re.escape(module),
        )


@RUNNERS.register_module()
class QuietRunner(Runner):  # type: ignore[misc]
    """mmengine's ``Runner`` without six messages that every mmseg run prints.

    Three Python warnings of mmseg (:data:`IRRELEVANT_WARNINGS`) and three log
    warnings of mmengine (:data:`IRRELEVANT_LOG_MESSAGES`) are about mmseg's and
    mmengine's own code, not about the user's config; each is matched by its
    module and message, nothing else is filtered. Select it with
    ``runner_type = "QuietRunner"`` (every config in ``mmseg_configs/`` inherits
    it from ``default_runtime.py``; mmseg's ``tools/train.py`` and
    ``tools/test.py`` honour ``runner_type``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Initializes the runner with the irrelevant warnings ignored.

        Args:
            *args: mmengine ``Runner`` arguments.
            **kwargs: mmengine ``Runner`` keyword arguments.
        """
        ignore_irrelevant_warnings()
        super().__init__(*args, **kwargs)

    def build_logger(self, *args: Any, **kwargs: Any) -> MMLogger:
        """Builds mmengine's logger and adds :class:`IrrelevantLogFilter`.

        Args:
            *args: mmengine ``build_logger`` arguments.
            **kwargs: mmengine ``build_logger`` keyword arguments.

        Returns:
            The logger.
        """
        logger = super().build_logger(*args, **kwargs)
        if not any(isinstance(f, IrrelevantLogFilter) for f in logger.filters):
            logger.addFilter(IrrelevantLogFilter())
        return logger
