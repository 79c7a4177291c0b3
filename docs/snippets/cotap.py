# One CoTAP ranking step on the embedded sample photos: the student learns the
# teacher's patch correspondences between an image x and its pair image x+.
import copy

import torch
from torch.utils.data import DataLoader

from lightly_cotap.data import SampleImageDataset, SemanticPairDataset
from lightly_cotap.loss import CoTAPLoss
from lightly_cotap.models import CoTAPVisionTransformer
from lightly_cotap.transforms import CoTAPTransform

torch.manual_seed(0)

# A 2-block ViT-Ti/16 with the object-aware filter; 64 px crops give 4 x 4 patches.
student = CoTAPVisionTransformer(
    "vit_tiny_patch16_224", img_size=64, depth=2, num_prototypes=4
)
teacher = copy.deepcopy(student).requires_grad_(False)

# x+ of each image: curated pairs here; NeighborIndex gives nearest neighbours.
transform = CoTAPTransform(global_crop_size=64, local_crop_size=32, n_local_views=0)
pairs = SemanticPairDataset(
    SampleImageDataset(), pairs=[[0, 1], [1, 0], [2, 3], [3, 2]], transform=transform
)
views, views_pos, _, _ = next(iter(DataLoader(pairs, batch_size=4)))


def student_dense(crops: list[torch.Tensor]) -> torch.Tensor:
    """Dense features of the global crops, views stacked on dim 1."""
    return torch.stack([student(crop).dense for crop in crops], dim=1)


@torch.no_grad()
def teacher_dense(crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features and foreground masks of the teacher's crops."""
    outputs = [teacher(crop, return_fg_mask=True) for crop in crops]
    dense = torch.stack([out.dense for out in outputs], dim=1)
    fg_mask = torch.stack([out.fg_mask for out in outputs], dim=1)
    return dense, fg_mask


teacher_x, fg_mask_x = teacher_dense(views["teacher"])
teacher_pos, fg_mask_pos = teacher_dense(views_pos["teacher"])

criterion = CoTAPLoss(pool_sizes=(2, 4), top_k=3, num_negatives=2)
loss = criterion(
    student_x=student_dense(views["student"][:2]),
    student_pos=student_dense(views_pos["student"][:2]),
    teacher_x=teacher_x,
    teacher_pos=teacher_pos,
    fg_mask_x=fg_mask_x,
    fg_mask_pos=fg_mask_pos,
)
loss.backward()
print(f"CoTAP loss: {loss.item():.4f}")
