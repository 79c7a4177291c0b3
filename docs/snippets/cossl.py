# CO-SSL with BYOL: every local feature (one per patch) of a view predicts the
# global representation of the other view, next to BYOL's global loss.
import copy

import torch
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from torch.utils.data import DataLoader

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.loss import CoSSLLoss
from lightly_cotap.models import CoTAPVisionTransformer

torch.manual_seed(0)

transform = BYOLTransform(
    view_1_transform=BYOLView1Transform(input_size=64),
    view_2_transform=BYOLView2Transform(input_size=64),
)
(x0, x1), _ = next(
    iter(DataLoader(SampleImageDataset(transform=transform), batch_size=8))
)

# Local features: the 4 x 4 patch features of a 2-block ViT-Ti/16 (no filter).
online = CoTAPVisionTransformer(
    "vit_tiny_patch16_224", img_size=64, depth=2, use_filter=False
)
target = copy.deepcopy(online).requires_grad_(False)  # e.g. an EMA copy

out0, out1 = online(x0), online(x1)
with torch.no_grad():
    target0, target1 = target(x0).cls, target(x1).cls

criterion = CoSSLLoss(w_s=0.3, mode="byol")
loss = criterion(
    global_online=[out0.cls, out1.cls],
    global_target=[target0, target1],
    local_online=[out0.dense, out1.dense],
)
loss.backward()
print(f"CO-SSL loss: {loss.item():.4f}")
