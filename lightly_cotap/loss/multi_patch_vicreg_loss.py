"""VICReg over n patches per image (BagSSL / intra-instance VICReg)."""

from __future__ import annotations

import torch
from lightly.loss.vicreg_loss import covariance_loss, invariance_loss, variance_loss
from lightly.utils import dist
from torch import Tensor, nn
from torch import distributed as torch_dist

_VAR_COV = ("per_patch", "pooled")


class MultiPatchVICRegLoss(nn.Module):
    """Implementation of the multi-patch VICReg loss of BagSSL [0].

    BagSSL (intra-instance VICReg) treats the n fixed-scale patches of an image as
    mutual positives. The invariance term pulls every patch projection to the
    mean projection of its image; the variance and covariance terms of VICReg [1]
    keep the projections from collapsing:

        L = lambda * 2n / (n - 1) * mean_(b, j) ||z_bj - zbar_b||^2 / D
            + mu * mean_j v(Z_j) + nu * 2 / n * sum_j c(Z_j)

    with Z_j the (B, D) projections of patch slot j. The invariance term equals
    the mean of the pairwise VICReg invariance over all patch pairs,
    1 / (n (n - 1)) sum_(j != k) MSE(z_j, z_k), since
    sum_(j, k) ||z_j - z_k||^2 = 2n sum_j ||z_j - zbar||^2. At n = 2 the loss
    equals Lightly's :class:`~lightly.loss.VICRegLoss` (whose terms it reuses);
    the 2 / n keeps VICReg's "sum over the two branches" scale of the
    covariance term.

    Design decision: ``var_cov="per_patch"`` (default) computes the variance /
    covariance statistics per patch slot and averages them, so every slot is a
    (B, D) batch as in VICReg and the loss at n = 2 is Lightly's VICReg loss;
    ``"pooled"`` computes them once over all B * n projections (with the same 2x
    covariance scale), which regularises the bag of patches as one distribution.

    - [0]: Chen et al., Bag of Image Patch Embedding Behind the Success of
      Self-Supervised Learning, 2023, https://arxiv.org/abs/2206.08954
    - [1]: VICReg, 2022, https://arxiv.org/abs/2105.04906

    Attributes:
        lambda_param:
            Scaling coefficient of the invariance term.
        mu_param:
            Scaling coefficient of the variance term.
        nu_param:
            Scaling coefficient of the covariance term.
        var_cov:
            ``"per_patch"`` or ``"pooled"``, see above.
        gather_distributed:
            If True, the variance and covariance statistics use the projections
            of all processes.
        eps:
            Epsilon for numerical stability.

    Examples:
        >>> criterion = MultiPatchVICRegLoss()
        >>> patches = transform(images)  # BagSSLTransform: n (B, C, h, w) tensors
        >>> z = torch.stack([model(p) for p in patches], dim=1)  # (B, n, D)
        >>> loss = criterion(projections=z)
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        var_cov: str = "per_patch",
        gather_distributed: bool = False,
        eps: float = 1e-4,
    ) -> None:
        """Initializes the MultiPatchVICRegLoss with the specified parameters.

        Args:
            lambda_param: Scaling coefficient of the invariance term.
            mu_param: Scaling coefficient of the variance term.
            nu_param: Scaling coefficient of the covariance term.
            var_cov: ``"per_patch"`` or ``"pooled"`` statistics.
            gather_distributed: Use the projections of all processes for the
                variance and covariance statistics.
            eps: Epsilon for numerical stability.

        Raises:
            ValueError: If ``var_cov`` is unknown, or gather_distributed is True
                but torch.distributed is not available.
        """
        super().__init__()
        if var_cov not in _VAR_COV:
            raise ValueError(f"var_cov must be one of {_VAR_COV}, got {var_cov!r}.")
        if gather_distributed and not torch_dist.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. "
                "Please set gather_distributed=False or install a torch version with "
                "distributed support."
            )
        self.lambda_param = lambda_param
        self.mu_param = mu_param
        self.nu_param = nu_param
        self.var_cov = var_cov
        self.gather_distributed = gather_distributed
        self.eps = eps

    def forward(self, *, projections: Tensor) -> Tensor:
        """Returns the multi-patch VICReg loss.

        Args:
            projections:
                Projections of n patches of each of B images.
                Shape: (B, n, D)

        Returns:
            The scalar loss.

        Raises:
            ValueError: If ``projections`` is not 3-D, has fewer than 2 patches
                or fewer than 2 images.
        """
        if projections.ndim != 3:
            raise ValueError(
                "projections must have shape (B, n, D), got "
                f"{tuple(projections.shape)}."
            )
        batch_size, n_patches, _ = projections.shape
        if batch_size < 2 or n_patches < 2:
            raise ValueError(
                "projections need at least 2 images and 2 patches per image, got "
                f"shape {tuple(projections.shape)}."
            )
        mean = projections.mean(dim=1, keepdim=True).expand_as(projections)
        inv_loss = (
            2 * n_patches / (n_patches - 1) * invariance_loss(x=projections, y=mean)
        )

        z = projections
        if self.gather_distributed and dist.world_size() > 1:
            z = torch.cat(dist.gather(z), dim=0)
        if self.var_cov == "pooled":
            z = z.reshape(-1, z.shape[-1])
        # variance_loss / covariance_loss average over the patch slots (dim 1).
        var_loss = variance_loss(x=z, eps=self.eps)
        cov_loss = 2 * covariance_loss(x=z)
        loss: Tensor = (
            self.lambda_param * inv_loss
            + self.mu_param * var_loss
            + self.nu_param * cov_loss
        )
        return loss
