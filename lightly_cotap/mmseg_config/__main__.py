"""``python -m lightly_cotap.mmseg_config``."""

from lightly_cotap.mmseg_config.command import main

raise SystemExit(main())
