"""Receptive-field bounded torchvision ResNets (BagNet-style), e.g. for CO-SSL.

CO-SSL [0] aligns the local features of a ResNet whose pre-pooling units see only a
bounded part of the image (RF-ResNets such as RF29-ResNet18 or RF99-ResNet50).
Design decision: :func:`cap_receptive_field` uses the BagNet [1] construction, which
[0] compares against and which bounds the receptive field exactly while keeping every
feature-map size, channel count and stride of the ResNet (heads, poolings and the
weights of untouched layers fit as before). Walking the network in order, every
k x k convolution (k > 1) of a residual branch that would grow the receptive field
beyond the cap is replaced by a 1 x 1 convolution with the same channels and stride,
using RF_out = RF_in + (k - 1) * jump and jump_out = jump * stride.

- [0]: Aubret et al., Seeing the Whole in the Parts in Self-Supervised
  Representation Learning, 2025, https://arxiv.org/abs/2501.02860
- [1]: Brendel and Bethge, Approximating CNNs with Bag-of-local-Features models
  works surprisingly well on ImageNet, 2019, https://arxiv.org/abs/1904.00760
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torchvision.models.resnet import ResNet


def _as_int(value: int | tuple[int, ...]) -> int:
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"Only square kernels / strides are supported: {value}.")
        return int(value[0])
    return int(value)


def _main_path(resnet: ResNet) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """Yields ``(parent, attribute, layer)`` for the stem and every residual conv."""
    yield resnet, "conv1", resnet.conv1
    yield resnet, "maxpool", resnet.maxpool
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in layer:
            for name in ("conv1", "conv2", "conv3"):
                conv = getattr(block, name, None)
                if isinstance(conv, nn.Conv2d):
                    yield block, name, conv


def _kernel_stride(layer: nn.Module) -> tuple[int, int]:
    """Effective kernel size ((k - 1) * dilation + 1) and stride of a layer."""
    if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
        kernel = _as_int(layer.kernel_size)
        dilation = _as_int(layer.dilation)
        return (kernel - 1) * dilation + 1, _as_int(layer.stride)
    return 1, 1  # e.g. nn.Identity in place of the max pool


def resnet_receptive_field(resnet: ResNet) -> int:
    """Returns the receptive field (in pixels) of the last feature map of a ResNet.

    Args:
        resnet: A torchvision ResNet (BasicBlock or Bottleneck).

    Returns:
        The side of the input window that one unit of ``layer4`` depends on.
    """
    rf, jump = 1, 1
    for _, _, layer in _main_path(resnet):
        kernel, stride = _kernel_stride(layer)
        rf += (kernel - 1) * jump
        jump *= stride
    return rf


def cap_receptive_field(resnet: ResNet, max_receptive_field: int) -> int:
    """Replaces convolutions by 1 x 1 ones until the receptive field is capped.

    Modifies ``resnet`` in place (BagNet-style, see the module docstring); the new
    1 x 1 convolutions are freshly initialised, so apply this before training.

    Args:
        resnet: A torchvision ResNet, e.g. ``torchvision.models.resnet18()``.
        max_receptive_field: Largest allowed receptive field in pixels (e.g. 29 or
            99 as in [0]).

    Returns:
        The receptive field of the modified network (<= ``max_receptive_field``).

    Raises:
        ValueError: If the stem (first conv + max pool) alone exceeds the cap.
    """
    rf, jump = 1, 1
    for parent, name, layer in list(_main_path(resnet)):
        kernel, stride = _kernel_stride(layer)
        grown = rf + (kernel - 1) * jump
        if grown > max_receptive_field and kernel > 1:
            if not isinstance(layer, nn.Conv2d) or parent is resnet:
                raise ValueError(
                    f"max_receptive_field={max_receptive_field} is smaller than the "
                    f"receptive field {grown} of the ResNet stem ({name})."
                )
            setattr(
                parent,
                name,
                nn.Conv2d(
                    layer.in_channels,
                    layer.out_channels,
                    kernel_size=1,
                    stride=stride,
                    groups=layer.groups,
                    bias=layer.bias is not None,
                ),
            )
            grown = rf
        rf = grown
        jump *= stride
    return rf
