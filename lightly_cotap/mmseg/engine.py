"""mmengine pieces for the CoTAP backbone: layer-decay optimiser, frozen check."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.registry import HOOKS, OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from lightly_cotap.mmseg.backbone import CoTAPViT

#: Parameters without weight decay (besides biases and other 1-D parameters).
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "prototypes")


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None) if is_model_wrapper(model) else None
    return inner if isinstance(inner, nn.Module) else model


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class CoTAPLayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):  # type: ignore[misc]
    """Layer-wise learning-rate decay for fine-tuning a :class:`CoTAPViT`.

    The BEiT / MAE / iBOT fine-tuning recipe: a parameter of layer id ``i``
    (see :meth:`CoTAPViT.get_layer_id`: embeddings 0, block b -> b + 1, the
    filter -> depth, heads -> depth + 1) gets the learning rate
    ``lr * layer_decay_rate ** (depth + 1 - i)``. Biases, other 1-D
    parameters, position embeddings and tokens get no weight decay. mmseg's
    own ``LearningRateDecayOptimizerConstructor`` only recognises its own
    ViT classes by name, hence this constructor.

    ``paramwise_cfg=dict(layer_decay_rate=0.65)``; no other keys.

    The groups are ordered from the heads (the base learning rate) down to the
    embeddings, so the ``lr`` that mmengine logs (that of the first group) is the
    base rate.

    Raises:
        ValueError: (when called) if the segmentor's backbone is not a
            CoTAPViT, or it is frozen (this constructor is for fine-tuning).
    """

    def __init__(
        self, optim_wrapper_cfg: dict[str, Any], paramwise_cfg: dict[str, Any] | None
    ) -> None:
        """Initializes the constructor.

        Args:
            optim_wrapper_cfg: mmengine's optimiser wrapper config.
            paramwise_cfg: ``dict(layer_decay_rate=...)`` (default rate 0.65).

        Raises:
            ValueError: If ``paramwise_cfg`` has other keys or the rate is not in
                (0, 1].
        """
        paramwise_cfg = dict(paramwise_cfg or {})
        unknown = set(paramwise_cfg) - {"layer_decay_rate"}
        if unknown:
            raise ValueError(
                f"{type(self).__name__} accepts only paramwise_cfg="
                f"dict(layer_decay_rate=...), got extra keys {sorted(unknown)}."
            )
        rate = float(paramwise_cfg.setdefault("layer_decay_rate", 0.65))
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"layer_decay_rate must be in (0, 1], got {rate}.")
        self.layer_decay_rate = rate
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(
        self, params: list[dict[str, Any]], module: nn.Module, **kwargs: Any
    ) -> None:
        """Adds one parameter group per (layer id, weight decay) to ``params``.

        Args:
            params: The parameter groups, extended in place.
            module: The segmentor (its ``backbone`` must be a CoTAPViT).
            **kwargs: Unused (mmengine's signature).

        Raises:
            ValueError: If the backbone is not a CoTAPViT or is frozen.
        """
        backbone = getattr(module, "backbone", None)
        if not isinstance(backbone, CoTAPViT):
            raise ValueError(
                f"{type(self).__name__} needs a segmentor whose backbone is CoTAPViT, "
                f"got {type(backbone).__name__}."
            )
        if backbone.frozen:
            raise ValueError(
                f"{type(self).__name__} is a fine-tuning optimiser: it would update "
                "the backbone, but the backbone is frozen (frozen=True). Use the "
                "linear-probe schedule or set model.backbone.frozen=False."
            )
        num_layers = backbone.num_layers
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            short = name.rsplit(".", 1)[-1]
            no_decay = (
                param.ndim == 1 or name.endswith(".bias") or short in _NO_DECAY_NAMES
            )
            if name.startswith("backbone."):
                layer_id = backbone.get_layer_id(name[len("backbone.") :])
            else:
                layer_id = num_layers - 1
            scale = self.layer_decay_rate ** (num_layers - 1 - layer_id)
            key = (layer_id, no_decay)
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "lr": self.base_lr * scale,
                    "weight_decay": 0.0 if no_decay else self.base_wd,
                }
            groups[key]["params"].append(param)
        ordered = sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1]))
        summary = ", ".join(
            f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}: "
            f"lr={g['lr']:.3g} ({len(g['params'])})"
            for (layer_id, no_decay), g in ordered
        )
        print_log(f"Layer-decay parameter groups: {summary}", logger="current")
        params.extend(g for _, g in ordered)


@HOOKS.register_module()
class FrozenBackboneCheckHook(Hook):  # type: ignore[misc]
    """Fails loudly when a frozen :class:`CoTAPViT` could be or was trained.

    - ``before_train``: every parameter of a frozen backbone must have
      ``requires_grad=False`` (otherwise the optimiser would update it);
    - after the first training iteration and at the end of training: the
      backbone parameters must be unchanged (fingerprints: sum and sum of
      squares in float64). This catches optimisers that change parameters
      without gradients (e.g. weight decay applied to every parameter).

    Add it with ``custom_hooks = [dict(type='FrozenBackboneCheckHook')]`` (the
    linear-probe configs do). Without a frozen CoTAPViT it does nothing.
    """

    priority = "VERY_HIGH"

    def __init__(self) -> None:
        """Initializes the hook (nothing recorded yet)."""
        self._fingerprints: dict[str, torch.Tensor] = {}
        self._backbone: CoTAPViT | None = None
        self._checked_first_iter = False

    def before_train(self, runner: Any) -> None:
        """Checks ``requires_grad`` and records the parameter fingerprints.

        Args:
            runner: The mmengine runner.

        Raises:
            RuntimeError: If a frozen backbone has trainable parameters.
        """
        backbone = getattr(_unwrap(runner.model), "backbone", None)
        if not isinstance(backbone, CoTAPViT) or not backbone.frozen:
            self._backbone = None
            return
        self._backbone = backbone
        trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(
                "The backbone is frozen (frozen=True) but these parameters have "
                f"requires_grad=True, so the optimiser would update them: "
                f"{trainable[:5]}{' ...' if len(trainable) > 5 else ''}."
            )
        self._fingerprints = _fingerprints(backbone)
        self._checked_first_iter = False

    def after_train_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Any = None,
        outputs: Any = None,
    ) -> None:
        """Compares the fingerprints after the first iteration.

        Args:
            runner: The mmengine runner.
            batch_idx: Index of the iteration.
            data_batch: Unused (mmengine's signature).
            outputs: Unused (mmengine's signature).
        """
        if self._backbone is not None and not self._checked_first_iter:
            self._checked_first_iter = True
            self._compare(runner)

    def after_train(self, runner: Any) -> None:
        """Compares the fingerprints at the end of training.

        Args:
            runner: The mmengine runner.
        """
        if self._backbone is not None:
            self._compare(runner)

    def _compare(self, runner: Any) -> None:
        assert self._backbone is not None
        now = _fingerprints(self._backbone)
        changed = [
            name
            for name, before in self._fingerprints.items()
            if not torch.equal(before, now[name])
        ]
        if changed:
            optimizer = getattr(runner.optim_wrapper, "optimizer", runner.optim_wrapper)
            raise RuntimeError(
                "The frozen backbone (frozen=True) was changed during training by the "
                f"optimiser {type(optimizer).__name__}, which updates parameters "
                f"without gradients: {changed[:5]}{' ...' if len(changed) > 5 else ''}."
                " Exclude the backbone from the optimiser (e.g. paramwise_cfg="
                "dict(custom_keys={'backbone': dict(lr_mult=0.0, decay_mult=0.0)})) "
                "or use another optimiser."
            )


def _fingerprints(module: nn.Module) -> dict[str, torch.Tensor]:
    """Sum and sum of squares of every parameter, in float64 on the CPU."""
    with torch.no_grad():
        return {
            name: torch.stack(
                [param.double().sum(), param.double().square().sum()]
            ).cpu()
            for name, param in module.named_parameters()
        }
