# This example requires the following dependencies to be installed:
# pip install lightly-cotap

# Note: The model and training settings do not follow the reference settings
# from the paper. The settings are chosen such that the example can easily be
# run on a small dataset with a single GPU (here: the 8 embedded sample images
# on a CPU).
#
# CO-BYOL (CO-SSL, https://arxiv.org/abs/2501.02860) as a LightningModule. For
# multi-GPU training add strategy="ddp" and sync_batchnorm=True to the Trainer;
# the CO-BYOL loss compares no samples across images, so no gathering is needed.

import copy
import os

import pytorch_lightning as pl
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


class CoBYOL(pl.LightningModule):
    def __init__(self, grid_size: int = 2, w_s: float = 0.3) -> None:
        super().__init__()
        self.grid_size = grid_size
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-2])
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

        self.criterion = CoSSLLoss(w_s=w_s)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature_map = self.backbone(x)
        y = feature_map.mean(dim=(2, 3))
        p = self.prediction_head(self.projection_head(y))
        # n x n local features, channel-last (B, n, n, 512) for the local heads.
        local = F.adaptive_avg_pool2d(feature_map, self.grid_size).permute(0, 2, 3, 1)
        local_p = self.local_prediction_head(self.local_projection_head(local))
        return p, local_p

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.backbone_momentum(x).mean(dim=(2, 3))
        return self.projection_head_momentum(y), self.local_projection_head_momentum(y)

    def training_step(
        self, batch: tuple[list[Tensor], Tensor], batch_idx: int
    ) -> Tensor:
        momentum = cosine_schedule(
            self.current_epoch, self.trainer.max_epochs, 0.996, 1
        )
        utils.update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        utils.update_momentum(
            self.projection_head, self.projection_head_momentum, m=momentum
        )
        utils.update_momentum(
            self.local_projection_head,
            self.local_projection_head_momentum,
            m=momentum,
        )
        x0, x1 = batch[0]
        p0, local_p0 = self.forward(x0)
        p1, local_p1 = self.forward(x1)
        z0, local_z0 = self.forward_momentum(x0)
        z1, local_z1 = self.forward_momentum(x1)
        terms = self.criterion.forward_components(
            global_online=[p0, p1],
            global_target=[z0, z1],
            local_online=[local_p0, local_p1],
            local_target=[local_z0, local_z1],
        )
        self.log_dict(
            {
                "train_loss": terms.total,
                "global_loss": terms.global_loss,
                "local_loss": terms.local_loss,
            },
            prog_bar=True,
            batch_size=x0.shape[0],
        )
        return terms.total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.06)


model = CoBYOL()

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

epochs = int(os.environ.get("LIGHTLY_COTAP_EXAMPLE_EPOCHS", "10"))
accelerator = "gpu" if torch.cuda.is_available() else "cpu"

trainer = pl.Trainer(max_epochs=epochs, devices=1, accelerator=accelerator)
trainer.fit(model=model, train_dataloaders=dataloader)
