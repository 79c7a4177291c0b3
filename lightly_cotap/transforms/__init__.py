"""lightly_cotap.transforms package."""

from lightly_cotap.transforms.bagssl_transform import (
    BagSSLTransform,
    BagSSLViewTransform,
)
from lightly_cotap.transforms.cotap_transform import CoTAPTransform, CoTAPViews
from lightly_cotap.transforms.crop_alignment import (
    box_intersection,
    crop_pair_grid_boxes,
    image_boxes_to_grid,
    resample_crop_features,
)

__all__ = [
    "BagSSLTransform",
    "BagSSLViewTransform",
    "CoTAPTransform",
    "CoTAPViews",
    "box_intersection",
    "crop_pair_grid_boxes",
    "image_boxes_to_grid",
    "resample_crop_features",
]
