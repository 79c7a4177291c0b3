# This example requires the following dependencies to be installed:
# pip install lightly-cotap

# Note: The model and training settings do not follow the reference settings
# from the paper. The settings are chosen such that the example can easily be
# run on a small dataset with a single GPU (here: the embedded sample images on
# a CPU).
#
# Semantic-pair pretraining (https://arxiv.org/abs/2510.08722): the positive
# pair of SimCLR is two *different* images of the same class instead of two
# augmentations of one image. The pairs come from a curated list (as in the
# paper) or, approximately, from class labels:
#     SemanticPairDataset(dataset, labels=dataset.targets, transform=...)
# The loss is SimCLR's NT-Xent. ClassAwareNTXentLoss additionally removes the
# other same-class pairs of the batch from the negatives when it gets labels
# (default off, as in the paper: call criterion(z0, z1) without labels).

import os

import numpy as np
import torch
import torchvision
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRViewTransform
from torch import Tensor, nn

from lightly_cotap.data import SampleImageDataset, SemanticPairDataset
from lightly_cotap.loss import ClassAwareNTXentLoss


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(512, 512, 128)

    def forward(self, x: Tensor) -> Tensor:
        x = self.backbone(x).flatten(start_dim=1)
        z: Tensor = self.projection_head(x)
        return z


resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1])
model = SimCLR(backbone)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

images = SampleImageDataset()
# A hand-curated list of semantic pairs, by file name, with a class per pair.
curated = [
    ("astronaut.jpg", "camera.jpg", "person"),
    ("hubble_deep_field.jpg", "rocket.jpg", "space"),
    ("coffee.jpg", "coins.jpg", "object"),
]
index_of = {name: i for i, name in enumerate(images.filenames)}
pairs = [(index_of[a], index_of[b]) for a, b, _ in curated]
pairs += [(b, a) for a, b in pairs]  # use every pair in both directions
class_ids = {name: i for i, name in enumerate(sorted({c for _, _, c in curated}))}
image_class = np.full(len(images), -1)
for a, b, name in curated:
    image_class[[index_of[a], index_of[b]]] = class_ids[name]

# Each item is (view of x, view of x+, index of x, index of x+).
dataset = SemanticPairDataset(
    images, pairs=pairs, transform=SimCLRViewTransform(input_size=64)
)

dataloader = torch.utils.data.DataLoader(
    dataset,
    batch_size=6,
    shuffle=True,
    drop_last=True,
    num_workers=0,
)

criterion = ClassAwareNTXentLoss(temperature=0.5)
optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

epochs = int(os.environ.get("LIGHTLY_COTAP_EXAMPLE_EPOCHS", "10"))

print("Starting Training")
for epoch in range(epochs):
    total_loss = 0
    for x0, x1, index, _ in dataloader:
        x0 = x0.to(device)
        x1 = x1.to(device)
        labels = torch.as_tensor(image_class[index.numpy()], device=device)
        z0 = model(x0)
        z1 = model(x1)
        loss = criterion(z0, z1, labels=labels)
        total_loss += loss.detach()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    avg_loss = total_loss / len(dataloader)
    print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}")
