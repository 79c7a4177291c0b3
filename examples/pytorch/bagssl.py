# This example requires the following dependencies to be installed:
# pip install lightly-cotap

# Note: The model and training settings do not follow the reference settings
# from the paper. The settings are chosen such that the example can easily be
# run on a small dataset with a single GPU (here: the 8 embedded sample images
# on a CPU).
#
# BagSSL (intra-instance VICReg, https://arxiv.org/abs/2206.08954): train VICReg
# on n fixed-scale patches per image, pulling every patch projection to the mean
# projection of its image; the image representation is the mean of the patch
# embeddings (before the projector).

import os

import torch
import torchvision
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor, nn

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.loss import MultiPatchVICRegLoss
from lightly_cotap.models.modules import BagOfPatchesAggregator, grid_patches
from lightly_cotap.transforms import BagSSLTransform


class BagSSL(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BarlowTwinsProjectionHead(512, 1024, 1024)

    def forward(self, patches: list[Tensor]) -> Tensor:
        # patches: list of n tensors (B, C, h, w) -> projections (B, n, D)
        n = len(patches)
        x = torch.cat(patches)  # (n * B, C, h, w), patch-major
        z: Tensor = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return z.reshape(n, -1, z.shape[-1]).transpose(0, 1)


resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1])
model = BagSSL(backbone)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

# 4 patches of 32 x 32 pixels per image, from images resized to 96 pixels.
transform = BagSSLTransform(n_patches=4, patch_size=32, image_size=96)
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

criterion = MultiPatchVICRegLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

epochs = int(os.environ.get("LIGHTLY_COTAP_EXAMPLE_EPOCHS", "10"))

print("Starting Training")
for epoch in range(epochs):
    total_loss = 0
    for batch in dataloader:
        patches = [x.to(device) for x in batch[0]]
        loss = criterion(projections=model(patches))
        total_loss += loss.detach()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    avg_loss = total_loss / len(dataloader)
    print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}")

# Evaluation: the image embedding is the mean backbone embedding of a dense grid
# of patches of the training scale.
eval_transform = T.Compose(
    [
        T.Resize(96),
        T.CenterCrop(96),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
    ]
)
eval_loader = torch.utils.data.DataLoader(
    SampleImageDataset(transform=eval_transform), batch_size=8
)
aggregator = BagOfPatchesAggregator(model.backbone, chunk_size=64).eval()
with torch.no_grad():
    for images, _ in eval_loader:
        grid = grid_patches(images.to(device), patch_size=32, stride=16)
        embeddings = aggregator(grid)
        print(f"image embeddings: {tuple(embeddings.shape)}")
