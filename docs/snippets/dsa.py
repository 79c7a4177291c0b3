# DSA on SimCLR: a learnable regulator decides which pairs of samples the loss
# pulls together and which it pushes apart, guided by frozen reference features.
import copy

import torch
import torchvision
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn
from torch.utils.data import DataLoader

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.loss import DSALoss
from lightly_cotap.models.modules import DSARegulator

torch.manual_seed(0)

# Two SimCLR views plus the un-augmented image for the good-neighbour scores.
origin = T.Compose(
    [
        T.Resize(64),
        T.CenterCrop(64),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
    ]
)
transform = MultiViewTransform([*SimCLRTransform(input_size=64).transforms, origin])
(x0, x1, x_origin), _ = next(
    iter(DataLoader(SampleImageDataset(transform=transform), batch_size=8))
)

resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1], nn.Flatten())
projection_head = nn.Sequential(SimCLRProjectionHead(512, 512, 64), nn.BatchNorm1d(64))
reference = copy.deepcopy(backbone).requires_grad_(False)  # e.g. an EMA copy
regulator = DSARegulator(input_dim=64)

z0 = projection_head(backbone(x0))
z1 = projection_head(backbone(x1))
criterion = DSALoss(temperature=0.5, k=4)  # k < batch size
with torch.no_grad():
    reference0, reference1 = reference(x0), reference(x1)
    reference_origin = reference(x_origin)
loss = criterion(
    out0=z0,
    out1=z1,
    aggregation=regulator(z0, z1),  # (4, N, N) matrices in [0, 1]
    reference0=reference0,
    reference1=reference1,
    reference_origin=reference_origin,
)
loss.backward()
print(f"DSA loss: {loss.item():.4f}")
