from __future__ import annotations

import torch

from lightly_cotap.eval import dense_feature_fn, extract_dense_features
from lightly_cotap.models import CoTAPVisionTransformer


def test_dense_feature_fn_hands_the_models_dense_output_to_eval() -> None:
    torch.manual_seed(0)
    model = CoTAPVisionTransformer("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    images = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        dense = model(images).dense
        got = dense_feature_fn(model)(images)
    assert dense.shape == (3, 2, 3, model.out_dim)  # the model is channel-last
    torch.testing.assert_close(got, dense, rtol=0, atol=0)
    dataset = [(images[i], torch.zeros(32, 48, dtype=torch.long)) for i in range(3)]
    cache = extract_dense_features(
        dense_feature_fn(model), dataset, label_size=None, batch_size=2, progress=False
    )
    torch.testing.assert_close(cache.features, got)
