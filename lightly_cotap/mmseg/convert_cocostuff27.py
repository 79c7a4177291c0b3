"""Command line of the COCO-Stuff-27 label converter.

``python -m lightly_cotap.mmseg.convert_cocostuff27 data/coco_stuff164k/annotations``
writes ``<id>_labelTrainIds27.png`` next to every raw label map ``<id>.png``; see
:mod:`lightly_cotap.mmseg.cocostuff27`.
"""

from __future__ import annotations

from lightly_cotap.mmseg.cocostuff27 import main

if __name__ == "__main__":
    main()
