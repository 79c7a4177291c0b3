# This example requires the following dependencies to be installed:
# pip install lightly-cotap

# Note: The model and training settings do not follow the reference settings
# from the paper. The settings are chosen such that the example can easily be
# run on a small dataset with a single GPU (here: the 8 embedded sample images
# on a CPU). The paper uses a batch size of 256 and k=20 neighbours.
#
# DSA (Dynamic Semantic Adjuster, https://arxiv.org/abs/2407.13541) adds to
# SimCLR a learnable regulator that decides which pairs of samples to pull
# together (aggregation) and which to push apart (separation). The reference
# features come from a frozen EMA copy of the backbone instead of the official
# code's ImageNet-supervised ResNet, so that training stays label-free.

import copy
import os

import torch
import torchvision
from lightly.models import utils
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.loss import DSALoss
from lightly_cotap.models.modules import DSARegulator


class DSA(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(512, 512, 64)
        # The official code normalises the embeddings with an extra batch norm.
        self.bn = nn.BatchNorm1d(64)
        self.regulator = DSARegulator(input_dim=64)
        # Frozen reference encoder: an EMA copy of the backbone.
        self.reference = copy.deepcopy(backbone)
        utils.deactivate_requires_grad(self.reference)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x).flatten(start_dim=1)
        z: Tensor = self.bn(self.projection_head(features))
        return z

    @torch.no_grad()
    def forward_reference(self, x: Tensor) -> Tensor:
        features: Tensor = self.reference(x).flatten(start_dim=1)
        return features


resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1])
model = DSA(backbone)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

# Two SimCLR views plus the un-augmented image (for the good-neighbour scores).
input_size = 64
simclr = SimCLRTransform(input_size=input_size)
origin = T.Compose(
    [
        T.Resize(input_size),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
    ]
)
transform = MultiViewTransform([*simclr.transforms, origin])

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

# k must be smaller than the batch size (k=20 with batch size 256 in the paper).
criterion = DSALoss(temperature=0.5, lambda1=1.0, lambda2=0.01, k=4)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-6)

epochs = int(os.environ.get("LIGHTLY_COTAP_EXAMPLE_EPOCHS", "10"))

print("Starting Training")
for epoch in range(epochs):
    total_loss = 0
    momentum_val = cosine_schedule(epoch, epochs, 0.99, 1)
    for batch in dataloader:
        x0, x1, x_origin = (x.to(device) for x in batch[0])
        utils.update_momentum(model.backbone, model.reference, m=momentum_val)
        z0 = model(x0)
        z1 = model(x1)
        loss = criterion(
            out0=z0,
            out1=z1,
            aggregation=model.regulator(z0, z1),
            reference0=model.forward_reference(x0),
            reference1=model.forward_reference(x1),
            reference_origin=model.forward_reference(x_origin),
        )
        total_loss += loss.detach()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    avg_loss = total_loss / len(dataloader)
    print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}")
