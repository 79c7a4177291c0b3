"""Compatibility layer that lets mmsegmentation run on ``mmcv-lite``.

``mmcv-lite`` is the pure-Python build of mmcv: it has no compiled extension
(``mmcv._ext``), so ``import mmcv.ops`` fails and with it ``import
mmseg.models``, because mmseg imports ``point_sample``, ``sigmoid_focal_loss``,
``CrissCrossAttention`` and ``PSAMask`` from ``mmcv.ops`` at import time. This
is the usual situation on CPU machines and with recent torch releases, for
which no compiled mmcv wheels exist.

:func:`apply` fixes that without touching mmcv's files:

- With the full mmcv (``mmcv._ext`` importable) it patches nothing.
- With mmcv-lite it registers a stand-in ``mmcv._ext`` module *before*
  ``mmcv.ops`` is imported. mmcv's own Python code then loads unchanged, so
  ``from mmcv.ops import X`` works for every ``X``:

  - ``point_sample`` and ``CrissCrossAttention`` are pure PyTorch in mmcv
    already (``F.grid_sample`` and einsum) and run as they are.
  - The kernels behind ``sigmoid_focal_loss`` / ``SigmoidFocalLoss`` and
    ``PSAMask`` are re-implemented here in pure PyTorch (same formulas as
    mmcv's CPU/CUDA kernels), so mmcv's autograd wrappers work on any device.
  - Every other kernel is a placeholder that raises
    :class:`MissingCompiledOpError` when it is *called* (never at import),
    naming the kernel and how to install the full mmcv.

:mod:`lightly_cotap.export` writes backbones that hold only tensors and
plain Python values, so mmengine 0.10 (which calls ``torch.load`` without
``weights_only``) loads them under torch >= 2.6, where ``weights_only=True``
is the default. Checkpoints that mmengine's runner itself saves (for
``--resume``) hold ``HistoryBuffer`` objects and bound methods that the safe
unpickler rejects; nothing here widens that allow-list (it would need
``getattr``). Set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` to resume from a
checkpoint you trust.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

EXT_MODULE_NAME = "mmcv._ext"

#: Ops of ``mmcv.ops`` that work with mmcv-lite once :func:`apply` ran.
STAND_IN_OPS: tuple[str, ...] = (
    "point_sample",
    "CrissCrossAttention",
    "sigmoid_focal_loss",
    "SigmoidFocalLoss",
    "PSAMask",
)

FULL_MMCV_INSTALL = (
    'pip install -U openmim && mim install "mmcv>=2.0.0rc4,<2.2.0" '
    "(and uninstall mmcv-lite first)"
)

# Smallest normal float32, used by mmcv's focal loss kernels as log() floor.
_FLT_MIN = 1.1754943508222875e-38


class MissingCompiledOpError(NotImplementedError):
    """An mmcv op that needs compiled kernels was used with mmcv-lite."""


def _missing_kernel(name: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        raise MissingCompiledOpError(
            f"mmcv op kernel '{name}' needs mmcv's compiled extension "
            f"('{EXT_MODULE_NAME}'), which the installed mmcv "
            f"({_mmcv_version()}, mmcv-lite) does not ship. lightly_cotap.mmseg "
            f"provides pure-PyTorch stand-ins only for: {', '.join(STAND_IN_OPS)}. "
            f"To use this op install the full mmcv: {FULL_MMCV_INSTALL}."
        )

    kernel.__name__ = name
    kernel.__qualname__ = name
    return kernel


def _mmcv_version() -> str:
    mmcv = sys.modules.get("mmcv")
    return str(getattr(mmcv, "__version__", "unknown version"))


# ---------------------------------------------------------------------------
# Pure-PyTorch kernels with the call signatures of mmcv's extension functions.
# They write into the preallocated output tensors, like the compiled kernels.
# ---------------------------------------------------------------------------


def _focal_loss_class_weight(weight: Tensor, target: Tensor, like: Tensor) -> Tensor:
    """Per-sample weight ``weight[target]``; 1 where no weight or target invalid.

    Shape: weight (C,) or empty, target (N,) -> (N, 1).
    """
    if weight.numel() == 0:
        return like.new_ones(target.shape[0], 1)
    valid = (target >= 0) & (target < weight.numel())
    w = weight[target.clamp(0, weight.numel() - 1)]
    return torch.where(valid, w, torch.ones_like(w)).unsqueeze(1).to(like.dtype)


def sigmoid_focal_loss_forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor,
    output: Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
) -> None:
    """Element-wise sigmoid focal loss, as mmcv's ``sigmoid_focal_loss_forward``.

    Args:
        input: Logits. Shape: (N, C).
        target: Class indices; an index outside [0, C) has no positive class.
            Shape: (N,).
        weight: Per-class weight, or an empty tensor for none. Shape: (C,) or (0,).
        output: Written in place. Shape: (N, C).
        gamma: Focusing parameter.
        alpha: Weight of the positive term.
    """
    p = input.sigmoid()
    classes = torch.arange(input.shape[1], device=input.device)
    positive = target.unsqueeze(1) == classes.unsqueeze(0)
    term_p = (1.0 - p).pow(gamma) * p.clamp(min=_FLT_MIN).log()
    term_n = p.pow(gamma) * (1.0 - p).clamp(min=_FLT_MIN).log()
    loss = torch.where(positive, -alpha * term_p, -(1.0 - alpha) * term_n)
    output.copy_(loss * _focal_loss_class_weight(weight, target, input))


def sigmoid_focal_loss_backward(
    input: Tensor,
    target: Tensor,
    weight: Tensor,
    grad_input: Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
) -> None:
    """Gradient of :func:`sigmoid_focal_loss_forward` w.r.t. the logits.

    Args:
        input: Logits. Shape: (N, C).
        target: Class indices. Shape: (N,).
        weight: Class weights. Shape: (C,), or empty for none.
        grad_input: Output, written in place. Shape: (N, C).
        gamma: Focusing parameter.
        alpha: Weight of the positive term.
    """
    p = input.sigmoid()
    classes = torch.arange(input.shape[1], device=input.device)
    positive = target.unsqueeze(1) == classes.unsqueeze(0)
    log_p = p.clamp(min=_FLT_MIN).log()
    log_1mp = (1.0 - p).clamp(min=_FLT_MIN).log()
    term_p = (1.0 - p).pow(gamma) * (1.0 - p - gamma * p * log_p)
    term_n = p.pow(gamma) * (gamma * (1.0 - p) * log_1mp - p)
    grad = torch.where(positive, -alpha * term_p, -(1.0 - alpha) * term_n)
    grad_input.copy_(grad * _focal_loss_class_weight(weight, target, input))


def _psamask_collect_index(
    h_feature: int,
    w_feature: int,
    h_mask: int,
    w_mask: int,
    half_h_mask: int,
    half_w_mask: int,
    device: torch.device,
) -> Tensor:
    """Mask channel read by each output of the 'collect' PSA mask.

    ``index[y * W + x, h, w]`` is the channel of the input mask at (h, w) that
    holds the weight of feature position (y, x), or ``h_mask * w_mask`` (an
    all-zero padding channel) where (y, x) lies outside the mask window.

    Shape: (H * W, H, W).
    """
    y = torch.arange(h_feature, device=device).view(-1, 1, 1, 1)
    x = torch.arange(w_feature, device=device).view(1, -1, 1, 1)
    h = torch.arange(h_feature, device=device).view(1, 1, -1, 1)
    w = torch.arange(w_feature, device=device).view(1, 1, 1, -1)
    my = y - h + half_h_mask
    mx = x - w + half_w_mask
    valid = (my >= 0) & (my < h_mask) & (mx >= 0) & (mx < w_mask)
    index = torch.where(valid, my * w_mask + mx, h_mask * w_mask)
    return index.reshape(h_feature * w_feature, h_feature, w_feature)


def _transpose_positions(x: Tensor, h_feature: int, w_feature: int) -> Tensor:
    """Swap the (H * W) channel axis with the (H, W) grid. Shape: (N, HW, H, W)."""
    n = x.shape[0]
    hw = h_feature * w_feature
    return (
        x.reshape(n, hw, hw)
        .transpose(1, 2)
        .reshape(n, hw, h_feature, w_feature)
        .contiguous()
    )


def psamask_forward(
    input: Tensor,
    output: Tensor,
    psa_type: int,
    num_: int,
    h_feature: int,
    w_feature: int,
    h_mask: int,
    w_mask: int,
    half_h_mask: int,
    half_w_mask: int,
) -> None:
    """Point-wise spatial attention mask, as mmcv's ``psamask_forward``.

    Args:
        input: Over-complete attention map. Shape: (N, h_mask * w_mask, H, W).
        output: Written in place. Shape: (N, H * W, H, W).
        psa_type: 0 = 'collect', 1 = 'distribute'.
        num_: N.
        h_feature: H.
        w_feature: W.
        h_mask: Mask window height.
        w_mask: Mask window width.
        half_h_mask: ``(h_mask - 1) // 2``.
        half_w_mask: ``(w_mask - 1) // 2``.
    """
    index = _psamask_collect_index(
        h_feature, w_feature, h_mask, w_mask, half_h_mask, half_w_mask, input.device
    )
    padded = torch.cat([input, input.new_zeros(num_, 1, h_feature, w_feature)], 1)
    collected = padded.gather(1, index.unsqueeze(0).expand(num_, -1, -1, -1))
    if psa_type == 1:
        collected = _transpose_positions(collected, h_feature, w_feature)
    output.copy_(collected)


def psamask_backward(
    grad_output: Tensor,
    grad_input: Tensor,
    psa_type: int,
    num_: int,
    h_feature: int,
    w_feature: int,
    h_mask: int,
    w_mask: int,
    half_h_mask: int,
    half_w_mask: int,
) -> None:
    """Gradient of :func:`psamask_forward`; ``grad_input`` is written in place.

    Args:
        grad_output: Gradient of the output. Shape: (N, H * W, H, W).
        grad_input: Output, written in place. Shape: (N, h_mask * w_mask, H, W).
        psa_type: 0 (collect) or 1 (distribute), as in mmcv.
        num_: Batch size N.
        h_feature: Feature height H.
        w_feature: Feature width W.
        h_mask: Mask height.
        w_mask: Mask width.
        half_h_mask: ``(h_mask - 1) // 2``.
        half_w_mask: ``(w_mask - 1) // 2``.
    """
    if psa_type == 1:
        grad_output = _transpose_positions(grad_output, h_feature, w_feature)
    index = _psamask_collect_index(
        h_feature,
        w_feature,
        h_mask,
        w_mask,
        half_h_mask,
        half_w_mask,
        grad_output.device,
    )
    grad = grad_output.new_zeros(num_, h_mask * w_mask + 1, h_feature, w_feature)
    grad.scatter_add_(1, index.unsqueeze(0).expand(num_, -1, -1, -1), grad_output)
    grad_input.copy_(grad[:, :-1])


def get_compiler_version() -> str:
    """Stand-in for mmcv's build-info kernel (used by environment reports).

    Returns:
        A note that no compiled ops are present.
    """
    return "n/a (mmcv-lite, pure-PyTorch stand-ins from lightly_cotap)"


def get_compiling_cuda_version() -> str:
    """Stand-in for mmcv's build-info kernel (used by environment reports).

    Returns:
        A note that no compiled ops are present.
    """
    return "n/a (mmcv-lite)"


_KERNELS: dict[str, Callable[..., Any]] = {
    "sigmoid_focal_loss_forward": sigmoid_focal_loss_forward,
    "sigmoid_focal_loss_backward": sigmoid_focal_loss_backward,
    "psamask_forward": psamask_forward,
    "psamask_backward": psamask_backward,
    "get_compiler_version": get_compiler_version,
    "get_compiling_cuda_version": get_compiling_cuda_version,
}


class _StandInExtModule(types.ModuleType):
    """Replacement for ``mmcv._ext``: real stand-ins plus raising placeholders."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name in _KERNELS:
            return _KERNELS[name]
        return _missing_kernel(name)


def _make_ext_module() -> _StandInExtModule:
    module = _StandInExtModule(
        EXT_MODULE_NAME,
        "Pure-PyTorch stand-in for mmcv's compiled extension (lightly_cotap).",
    )
    # A spec without loader: importlib / pkgutil treat it as "no compiled ops".
    module.__spec__ = importlib.machinery.ModuleSpec(EXT_MODULE_NAME, None)
    module.__file__ = __file__
    return module


def is_patched() -> bool:
    """Whether :func:`apply` installed the stand-in ``mmcv._ext``.

    Returns:
        True if the stand-in is installed.
    """
    return isinstance(sys.modules.get(EXT_MODULE_NAME), _StandInExtModule)


def has_compiled_ops() -> bool:
    """Whether the installed mmcv ships its compiled extension (full mmcv).

    Returns:
        True for a full mmcv, False for mmcv-lite or the stand-in.

    Raises:
        ImportError: If mmcv is not installed at all.
    """
    if is_patched():
        return False
    try:
        return importlib.util.find_spec(EXT_MODULE_NAME) is not None
    except ModuleNotFoundError as err:
        raise ImportError(
            "lightly_cotap.mmseg needs mmcv. Install the full mmcv on GPU machines "
            f"({FULL_MMCV_INSTALL}) or mmcv-lite on CPU machines "
            '(pip install "lightly-cotap[mmseg,mmcv-lite]").'
        ) from err


def apply() -> bool:
    """Make ``import mmcv.ops`` (and so ``import mmseg.models``) work.

    Idempotent. Must run before anything imports ``mmcv.ops``; importing
    ``lightly_cotap.mmseg`` calls it first.

    Returns:
        True if the mmcv-lite stand-ins are active, False if the installed
        mmcv has compiled ops and nothing was patched.

    Raises:
        ImportError: If mmcv is missing, or ``mmcv.ops`` still fails to import.
    """
    if is_patched():
        return True
    if has_compiled_ops():
        return False
    sys.modules[EXT_MODULE_NAME] = _make_ext_module()
    try:
        importlib.import_module("mmcv.ops")
    except Exception as err:
        del sys.modules[EXT_MODULE_NAME]
        raise ImportError(
            f"mmcv.ops failed to import with lightly_cotap's mmcv-lite stand-ins "
            f"(mmcv {_mmcv_version()}, torch {torch.__version__}). Supported: "
            f"mmcv-lite 2.1 or the full mmcv ({FULL_MMCV_INSTALL})."
        ) from err
    return True
