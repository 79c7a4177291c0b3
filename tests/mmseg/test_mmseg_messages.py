"""Every warning and error of the mmseg adapter, with the message it gives.

Warnings are read from mmengine's logger (what a run's log shows), errors from
the exception. The remaining paths are tested next to their feature:
``test_mmseg_backbone.py`` (architecture mismatch, frozen backbone, layer decay,
frozen-backbone hook) and ``test_mmseg_compat.py`` (missing compiled op).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("mmseg")

from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

from lightly_cotap.export import export_backbone  # noqa: E402
from lightly_cotap.mmseg import (  # noqa: E402
    CoTAPLayerDecayOptimWrapperConstructor,
    CoTAPViT,
    compat,
    mmseg_state_dict,
)
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer  # noqa: E402

init_default_scope("mmseg")

ARCH = "vit_tiny_patch16_224"
TIMM: dict[str, Any] = dict(depth=2, patch_size=8)
IMG = 32


def _cfg(**kwargs: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        type="CoTAPViT", arch=ARCH, img_size=IMG, num_prototypes=4, timm_kwargs=TIMM
    )
    cfg.update(kwargs)
    return cfg


def _pretrained(path: Path | str) -> dict[str, Any]:
    return dict(type="Pretrained", checkpoint=str(path))


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CoTAPVisionTransformer(ARCH, img_size=IMG, num_prototypes=4, **TIMM)
    assert model.filter is not None
    model.filter.set_prototypes(torch.randn_like(model.filter.prototypes))
    path = tmp_path_factory.mktemp("messages") / "backbone.pth"
    export_backbone(model, path)
    return path


@pytest.fixture(scope="module")
def plain_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare timm state dict of the same ViT (no filter, no meta)."""
    model = CoTAPVisionTransformer(ARCH, use_filter=False, img_size=IMG, **TIMM)
    path = tmp_path_factory.mktemp("messages") / "timm_vit.pth"
    torch.save(model.vit.state_dict(), path)
    return path


# -- warnings (mmengine's logger) ----------------------------------------------


def test_frozen_backbone_without_checkpoint_warns(mm_log: Any) -> None:
    backbone = MODELS.build(_cfg(frozen=True))
    backbone.init_weights()
    assert mm_log.messages(logging.WARNING) == [
        "CoTAPViT is frozen but has no init_cfg checkpoint: probing randomly "
        "initialised features."
    ]


def test_plain_vit_checkpoint_with_filter_warns(mm_log: Any, plain_vit: Path) -> None:
    backbone = MODELS.build(_cfg(init_cfg=_pretrained(plain_vit)))
    backbone.init_weights()
    assert mm_log.messages(logging.WARNING) == [
        f"'{plain_vit}' has no object-aware filter weights: the filter is randomly "
        "initialised. For a plain ViT baseline use use_filter=False."
    ]
    # with use_filter=False it loads without a warning
    mm_log.records.clear()
    MODELS.build(_cfg(use_filter=False, init_cfg=_pretrained(plain_vit))).init_weights()
    assert mm_log.messages(logging.WARNING) == []


def test_loading_logs_the_report_and_the_resampled_grid(
    mm_log: Any, export: Path
) -> None:
    backbone = MODELS.build(
        dict(
            type="CoTAPViT", arch="auto", img_size=2 * IMG, init_cfg=_pretrained(export)
        )
    )
    backbone.init_weights()
    (info,) = [m for m in mm_log.messages(logging.INFO) if "CoTAPViT loaded" in m]
    assert info.startswith(f"CoTAPViT loaded {export}:\n")
    assert (
        "  pos_embed resampled from the checkpoint's 4x4 patch grid to 8x8 (bicubic, "
        "timm's resample_abs_pos_embed)"
    ) in info.splitlines()
    assert mm_log.messages(logging.WARNING) == []


# -- errors of the backbone ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(pretrained="a.pth", init_cfg=dict(type="Pretrained", checkpoint="b")),
            "Set either pretrained or init_cfg, not both.",
        ),
        (dict(drop_path_rate=1.0), "drop_path_rate must be in [0, 1), got 1.0."),
        (
            dict(img_size=(32, 32, 3)),
            "img_size must be an int or (H, W), got (32, 32, 3).",
        ),
        (
            dict(out_indices=()),
            "out_indices must be non-empty block indices in [-2, 2), got ().",
        ),
        (
            dict(out_indices=(2,)),
            "out_indices must be non-empty block indices in [-2, 2), got (2,).",
        ),
        (dict(out_indices=(1, 1)), "out_indices must be increasing, got (1, 1)."),
        (
            dict(out_indices=(0,)),
            "The last of out_indices must be the last block (1 or -1), whose level "
            "carries the filtered features; got (0,).",
        ),
        (
            dict(init_cfg=dict(type="Kaiming")),
            "CoTAPViT supports init_cfg=None or dict(type='Pretrained', "
            "checkpoint=..., prefix=...), got {'type': 'Kaiming'}.",
        ),
        (
            dict(init_cfg=dict(type="Pretrained", checkpoint="a.pth", strict=True)),
            "Unknown init_cfg keys for CoTAPViT: ['strict'].",
        ),
        (
            dict(init_cfg=dict(type="Pretrained")),
            "init_cfg needs a checkpoint path, got None.",
        ),
        (
            dict(arch="auto"),
            "CoTAPViT(arch='auto') takes the architecture from the init_cfg "
            "checkpoint, but init_cfg is not set.",
        ),
    ],
)
def test_invalid_configuration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        MODELS.build(_cfg(**kwargs))


def test_arch_auto_needs_an_export(tmp_path: Path, plain_vit: Path) -> None:
    with pytest.raises(ValueError) as info:
        MODELS.build(_cfg(arch="auto", init_cfg=_pretrained(plain_vit)))
    assert str(info.value) == (
        f"CoTAPViT(arch='auto') needs an exported checkpoint (with 'meta'), but "
        f"'{plain_vit}' has none. Export it with `python -m lightly_cotap.export "
        "--format mmseg --checkpoint IN --output OUT`, or set model.backbone.arch to "
        "a timm name (plus timm_kwargs)."
    )
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"not found: '{missing}'")):
        MODELS.build(_cfg(arch="auto", init_cfg=_pretrained(missing)))


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    missing = tmp_path / "cotap.pth"
    backbone = MODELS.build(_cfg(init_cfg=_pretrained(missing)))
    with pytest.raises(FileNotFoundError) as info:
        backbone.init_weights()
    assert str(info.value) == (
        f"CoTAPViT checkpoint not found: '{missing}' (set "
        "model.backbone.init_cfg.checkpoint to an exported backbone, see "
        "`python -m lightly_cotap.export --help`)."
    )


def test_prefix_without_keys(export: Path) -> None:
    backbone = MODELS.build(
        _cfg(init_cfg=dict(type="Pretrained", checkpoint=str(export), prefix="head"))
    )
    with pytest.raises(ValueError) as info:
        backbone.init_weights()
    assert str(info.value) == f"No key of '{export}' starts with the prefix 'head.'."


def test_keys_that_do_not_fit_name_the_configuration(
    tmp_path: Path, plain_vit: Path
) -> None:
    state = torch.load(plain_vit, weights_only=True)
    state["blocks.0.attn.extra"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    backbone = MODELS.build(_cfg(use_filter=False, init_cfg=_pretrained(path)))
    with pytest.raises(ValueError) as info:
        backbone.init_weights()
    message = str(info.value)
    assert message.startswith(
        f"Checkpoint '{path}' does not fit the backbone configured as CoTAPViT("
        f"arch='{ARCH}', embed_dim=192, depth=2, patch_size=8, use_filter=False, "
        "num_prototypes=4, prototype_size=3):\nCheckpoint keys do not match"
    )
    assert "unexpected in checkpoint: ['blocks.0.attn.extra']" in message


# -- errors of the engine pieces ---------------------------------------------------


def test_layer_decay_constructor_errors() -> None:
    wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1.0))
    with pytest.raises(
        ValueError, match=re.escape("layer_decay_rate must be in (0, 1], got 1.5.")
    ):
        CoTAPLayerDecayOptimWrapperConstructor(wrapper, dict(layer_decay_rate=1.5))
    segmentor = torch.nn.Module()
    segmentor.backbone = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError) as info:
        CoTAPLayerDecayOptimWrapperConstructor(wrapper, None)(segmentor)
    assert str(info.value) == (
        "CoTAPLayerDecayOptimWrapperConstructor needs a segmentor whose backbone is "
        "CoTAPViT, got Linear."
    )


def test_mmseg_state_dict_needs_the_plugin_model() -> None:
    with pytest.raises(
        TypeError, match=r"^model must be a CoTAPVisionTransformer, got Linear\.$"
    ):
        mmseg_state_dict(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


# -- errors of the mmcv-lite compatibility layer -------------------------------------


def test_compat_without_mmcv(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mmcv(name: str) -> None:
        raise ModuleNotFoundError("No module named 'mmcv'")

    monkeypatch.setattr(compat, "is_patched", lambda: False)
    monkeypatch.setattr(compat.importlib.util, "find_spec", no_mmcv)
    with pytest.raises(ImportError) as info:
        compat.has_compiled_ops()
    assert str(info.value) == (
        "lightly_cotap.mmseg needs mmcv. Install the full mmcv on GPU machines "
        f"({compat.FULL_MMCV_INSTALL}) or mmcv-lite on CPU machines "
        '(pip install "lightly-cotap[mmseg,mmcv-lite]").'
    )


def test_compat_when_mmcv_ops_still_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # keep the installed stand-in: apply() replaces and then removes the entry
    monkeypatch.setitem(
        sys.modules, compat.EXT_MODULE_NAME, sys.modules[compat.EXT_MODULE_NAME]
    )
    monkeypatch.setattr(compat, "is_patched", lambda: False)
    monkeypatch.setattr(compat, "has_compiled_ops", lambda: False)

    def broken(name: str) -> None:
        raise RuntimeError("incompatible mmcv")

    monkeypatch.setattr(compat.importlib, "import_module", broken)
    with pytest.raises(ImportError) as info:
        compat.apply()
    assert str(info.value).startswith(
        "mmcv.ops failed to import with lightly_cotap's mmcv-lite stand-ins (mmcv "
    )
    assert str(info.value).endswith(
        f"Supported: mmcv-lite 2.1 or the full mmcv ({compat.FULL_MMCV_INSTALL})."
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert compat.EXT_MODULE_NAME not in sys.modules  # nothing half-patched


def test_backbone_is_registered() -> None:
    assert MODELS.get("CoTAPViT") is CoTAPViT


# -- the QuietRunner's filters ----------------------------------------------------


def test_irrelevant_log_filter_drops_only_the_listed_warnings() -> None:
    from lightly_cotap.mmseg.runner import IRRELEVANT_LOG_MESSAGES, IrrelevantLogFilter

    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("mmengine", level, __file__, 1, message, None, None)

    keep = IrrelevantLogFilter().filter
    assert len(IRRELEVANT_LOG_MESSAGES) == 3
    for message, _ in IRRELEVANT_LOG_MESSAGES:
        assert not keep(record(logging.WARNING, message + " and more"))
        assert keep(record(logging.INFO, message))  # only warnings are dropped
    assert keep(record(logging.WARNING, "CoTAPViT is frozen but has no init_cfg"))


def test_irrelevant_python_warnings_are_ignored_by_module_and_message() -> None:
    import warnings

    from lightly_cotap.mmseg.runner import (
        IRRELEVANT_WARNINGS,
        ignore_irrelevant_warnings,
    )

    assert len(IRRELEVANT_WARNINGS) == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_irrelevant_warnings()
        for module, message, _ in IRRELEVANT_WARNINGS:
            warnings.warn_explicit(message + " ...", UserWarning, "x.py", 1, module)
            # the same text from another module, and another text, still show
            warnings.warn_explicit(message, UserWarning, "x.py", 1, "my_module")
            warnings.warn_explicit("other", UserWarning, "x.py", 1, module)
    assert len(caught) == 2 * len(IRRELEVANT_WARNINGS)
    assert {w.filename for w in caught} == {"x.py"}
