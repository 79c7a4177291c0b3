"""lightly_cotap.train package: the CoTAP recipe (LightningModule) and the train command."""

from lightly_cotap.train.cotap_module import CoTAPModule
from lightly_cotap.train.cotap_student import CoTAPStudent

__all__ = ["CoTAPModule", "CoTAPStudent"]
