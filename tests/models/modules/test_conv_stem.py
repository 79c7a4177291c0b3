from __future__ import annotations

import pytest
import torch
from torch import nn

from lightly_cotap.export import export_state_dict
from lightly_cotap.models.cotap_vit import CoTAPVisionTransformer
from lightly_cotap.models.modules.conv_stem import ConvStem


def test_stem_layers_and_output_shape() -> None:
    stem = ConvStem(3, 48, patch_size=8, base_width=4)
    convs = [m for m in stem.stem if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3
    assert [c.out_channels for c in convs] == [4, 8, 16]
    assert stem.in_channels == 16 and stem.out_channels == 48
    assert stem.kernel_size == (1, 1) and stem.image_channels == 3
    x = torch.randn(2, 3, 40, 24)
    out = stem.eval()(x)
    assert out.shape == (2, 48, 5, 3)
    # The 1 x 1 projection is applied after the strided layers.
    expected = nn.functional.conv2d(stem.stem(x), stem.weight, stem.bias)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("patch_size", [0, 1, 6, 12])
def test_stem_rejects_patch_sizes_that_are_not_powers_of_two(patch_size: int) -> None:
    with pytest.raises(ValueError, match="patch_size must be a power of two"):
        ConvStem(3, 32, patch_size=patch_size)


def _model(**kwargs: object) -> CoTAPVisionTransformer:
    return CoTAPVisionTransformer(
        "vit_tiny_patch16_224",
        depth=2,
        patch_size=8,
        img_size=32,
        num_prototypes=4,
        conv_stem=True,
        **kwargs,  # type: ignore[arg-type]
    )


def test_vit_with_stem_runs_checks_channels_and_round_trips() -> None:
    torch.manual_seed(0)
    model = _model().eval()
    assert model.conv_stem and isinstance(model.vit.patch_embed.proj, ConvStem)
    x = torch.randn(2, 3, 32, 48)
    out = model(x, return_fg_mask=True)
    assert out.dense.shape == (2, 4, 6, 2 * 192) and out.fg_mask is not None
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(2, 4, 32, 32))
    exported = export_state_dict(model)
    assert exported["meta"]["conv_stem"] is True
    assert "patch_embed.proj.stem.0.weight" in exported["state_dict"]
    rebuilt = CoTAPVisionTransformer.from_checkpoint(exported)
    assert rebuilt.conv_stem
    torch.testing.assert_close(rebuilt(x).dense, out.dense)


def test_plain_vit_has_no_stem_and_refuses_a_stem_checkpoint() -> None:
    plain = CoTAPVisionTransformer(
        "vit_tiny_patch16_224", depth=2, patch_size=8, img_size=32, num_prototypes=4
    )
    assert not plain.conv_stem
    assert export_state_dict(plain)["meta"]["conv_stem"] is False
    with pytest.raises(ValueError):
        plain.load_pretrained(export_state_dict(_model()), prefix="")
