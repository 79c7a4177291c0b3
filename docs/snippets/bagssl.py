# BagSSL: VICReg on a bag of small patches per image; the image representation is
# the mean embedding of its patches.
import torch
import torchvision
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import nn
from torch.utils.data import DataLoader

from lightly_cotap.data import SampleImageDataset
from lightly_cotap.loss import MultiPatchVICRegLoss
from lightly_cotap.models.modules import BagOfPatchesAggregator, grid_patches
from lightly_cotap.transforms import BagSSLTransform

torch.manual_seed(0)

# 4 random 32 px patches of every 96 px image.
transform = BagSSLTransform(n_patches=4, patch_size=32, image_size=96)
patches, _ = next(
    iter(DataLoader(SampleImageDataset(transform=transform), batch_size=8))
)

resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1], nn.Flatten())
projection_head = BarlowTwinsProjectionHead(512, 1024, 1024)

aggregator = BagOfPatchesAggregator(backbone)
embeddings = aggregator.embed_patches(patches)  # (B, n, 512)
projections = projection_head(embeddings.flatten(0, 1)).unflatten(0, (8, 4))

criterion = MultiPatchVICRegLoss()
loss = criterion(projections=projections)  # (B, n, D)
loss.backward()
print(f"multi-patch VICReg loss: {loss.item():.4f}")

# Evaluation: the mean embedding of a grid of overlapping patches of each image.
images = torch.randn(2, 3, 96, 96)
with torch.no_grad():
    features = aggregator(grid_patches(images, patch_size=32, stride=16))
print(f"bag-of-patches features: {tuple(features.shape)}")
