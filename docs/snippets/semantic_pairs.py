# SimCLR on semantic pairs: the positive of an image is another image of the same
# concept, and negatives of the same class are masked out of the NT-Xent loss.
import torch
import torchvision
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRViewTransform
from torch import nn
from torch.utils.data import DataLoader

from lightly_cotap.data import SampleImageDataset, SemanticPairDataset
from lightly_cotap.loss import ClassAwareNTXentLoss

torch.manual_seed(0)

images = SampleImageDataset()
index_of = {name: i for i, name in enumerate(images.filenames)}
curated = [("astronaut.jpg", "camera.jpg"), ("hubble_deep_field.jpg", "rocket.jpg")]
pairs = [(index_of[a], index_of[b]) for a, b in curated]
pairs += [(b, a) for a, b in pairs]  # use every pair in both directions
labels = torch.tensor([0, 1, 0, 1])  # the class of each pair

dataset = SemanticPairDataset(
    images, pairs=pairs, transform=SimCLRViewTransform(input_size=64)
)
x0, x1, index, index_pos = next(iter(DataLoader(dataset, batch_size=4)))

resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1])
projection_head = SimCLRProjectionHead(512, 512, 128)
z0 = projection_head(backbone(x0).flatten(start_dim=1))
z1 = projection_head(backbone(x1).flatten(start_dim=1))

criterion = ClassAwareNTXentLoss(temperature=0.5)
loss = criterion(z0, z1, labels=labels)
loss.backward()
print(f"class-aware NT-Xent loss: {loss.item():.4f}")
