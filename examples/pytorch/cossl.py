# This example requires the following dependencies to be installed:
# pip install lightly-cotap

# Note: The model and training settings do not follow the reference settings
# from the paper. The settings are chosen such that the example can easily be
# run on a small dataset with a single GPU (here: the 8 embedded sample images
# on a CPU).
#
# CO-BYOL (CO-SSL, https://arxiv.org/abs/2501.02860): BYOL plus a loss that
# aligns every local feature of one view (the feature map before global
# pooling, here average-pooled to a grid_size x grid_size grid) with the global
# representation of the other view, through separate position-wise heads.

import copy
import os

import torch
import torch.nn.functional as F
import torchvision
from lightly.models import utils
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.transforms.byol_transform import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
)
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.loss import CoSSLLoss
from lightly_cotap.models.modules import (
    CoSSLLocalPredictionHead,
    CoSSLLocalProjectionHead,
)


class CoBYOL(nn.Module):
    def __init__(self, backbone: nn.Module, grid_size: int = 2) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.backbone = backbone  # returns the feature map (B, 512, h, w)
        self.projection_head = BYOLProjectionHead(512, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.local_projection_head = CoSSLLocalProjectionHead(512, 1024, 256)
        self.local_prediction_head = CoSSLLocalPredictionHead(256, 1024, 256)

        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        self.local_projection_head_momentum = copy.deepcopy(self.local_projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)
        utils.deactivate_requires_grad(self.local_projection_head_momentum)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature_map = self.backbone(x)
        y = feature_map.mean(dim=(2, 3))
        p = self.prediction_head(self.projection_head(y))
        # n x n local features, channel-last (B, n, n, 512) for the local heads.
        local = F.adaptive_avg_pool2d(feature_map, self.grid_size).permute(0, 2, 3, 1)
        local_p = self.local_prediction_head(self.local_projection_head(local))
        return p, local_p  # (B, 256) and (B, grid_size, grid_size, 256)

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.backbone_momentum(x).mean(dim=(2, 3))
        z = self.projection_head_momentum(y)
        # Target of the local predictions: the target's *global* representation
        # through the target local head, g2_xi(y_xi).
        local_z = self.local_projection_head_momentum(y)
        return z, local_z


resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-2])
model = CoBYOL(backbone)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

transform = BYOLTransform(
    view_1_transform=BYOLView1Transform(input_size=64),
    view_2_transform=BYOLView2Transform(input_size=64),
)
# The embedded sample images; or any folder of images:
# dataset = LightlyDataset("path/to/folder", transform=transform)
dataset = SampleImageDataset(transform=transform)

dataloader = torch.utils.data.DataLoader(
    dataset,
    batch_size=8,
    shuffle=True,
    drop_last=True,
    num_workers=0,
)

# w_s weights the local loss: (1 - w_s) * BYOL + w_s * local.
criterion = CoSSLLoss(w_s=0.3)
optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

epochs = int(os.environ.get("LIGHTLY_COTAP_EXAMPLE_EPOCHS", "10"))

print("Starting Training")
for epoch in range(epochs):
    total_loss = 0
    momentum_val = cosine_schedule(epoch, epochs, 0.996, 1)
    for batch in dataloader:
        x0, x1 = (x.to(device) for x in batch[0])
        utils.update_momentum(model.backbone, model.backbone_momentum, m=momentum_val)
        utils.update_momentum(
            model.projection_head, model.projection_head_momentum, m=momentum_val
        )
        utils.update_momentum(
            model.local_projection_head,
            model.local_projection_head_momentum,
            m=momentum_val,
        )
        p0, local_p0 = model(x0)
        p1, local_p1 = model(x1)
        z0, local_z0 = model.forward_momentum(x0)
        z1, local_z1 = model.forward_momentum(x1)
        loss = criterion(
            global_online=[p0, p1],
            global_target=[z0, z1],
            local_online=[local_p0, local_p1],
            local_target=[local_z0, local_z1],
        )
        total_loss += loss.detach()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    avg_loss = total_loss / len(dataloader)
    print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}")
