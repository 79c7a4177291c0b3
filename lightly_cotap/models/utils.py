"""Model utilities: foreground masks from attention, spherical k-means and checkpoint
key mapping.

This module holds the ONE implementation of each of these helpers for the whole
project:

- :func:`foreground_mask_from_attention`: DINO/Leopart-style binary foreground mask
  from (CLS -> patch) attention maps, used for the CoTAP teacher [0].
- :func:`spherical_kmeans`: k-means on the unit sphere (cosine similarity), used to
  initialise the object prototypes of the object-aware filter [0].
- :func:`extract_backbone_state_dict` / :func:`load_backbone_state_dict`: map timm,
  DINO/iBOT, official CoTAP, Lightning and lightly-cotap checkpoints onto a
  :class:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer`, reporting every
  unused or missing key.

- [0]: Wen et al., Semantic Concentration for Self-Supervised Dense Representations
  Learning, 2025, https://arxiv.org/abs/2509.09429
- [1]: DINO, 2021, https://arxiv.org/abs/2104.14294
- [2]: Leopart, 2022, https://arxiv.org/abs/2204.13101
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------
# Foreground mask from attention
# ---------------------------------------------------------------------------


#: Rounding tolerance of the attention mass in foreground_mask_from_attention.
_MASS_TOLERANCE = 1e-6


def foreground_mask_from_attention(
    attention: Tensor,
    grid_size: tuple[int, int] | None = None,
    keep_mass: float = 0.6,
    blur_kernel_size: int = 7,
    blur_sigma: float = 0.6,
) -> Tensor:
    """Computes a binary foreground mask from attention maps.

    Follows DINO [1] / Leopart [2] as used by the CoTAP teacher [0]: the attention
    map is smoothed with a Gaussian blur and the smallest set of highest-attention
    patches that together hold ``keep_mass`` of the (blurred) attention mass is kept
    (up to a rounding tolerance of 1e-6 of the mass). Every kept patch has at least the
    (blurred) attention of every dropped patch.

    The blur uses reflect padding (torchvision's ``gaussian_blur``). For grids that
    are smaller than the kernel, the kernel size is reduced to the largest odd size
    that reflect padding supports (``2 * min(H, W) - 1``).

    Args:
        attention: Non-negative attention of the CLS token to the patches, usually
            averaged over heads. Shape: (B, N) with N = H * W, or (B, H, W).
        grid_size: The patch grid (H, W). Required for (B, N) input; for
            (B, H, W) input it is optional and must match.
        keep_mass: Fraction of the attention mass to keep, in (0, 1].
        blur_kernel_size: Size of the Gaussian kernel (odd). 1 disables the blur.
        blur_sigma: Standard deviation of the Gaussian kernel in patches.

    Returns:
        Boolean foreground mask. Shape: (B, H, W).

    Raises:
        ValueError: If the shapes or the arguments are invalid.
    """
    if not 0.0 < keep_mass <= 1.0:
        raise ValueError(f"keep_mass must be in (0, 1], got {keep_mass}.")
    if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
        raise ValueError(
            f"blur_kernel_size must be a positive odd integer, got {blur_kernel_size}."
        )
    if blur_sigma <= 0:
        raise ValueError(f"blur_sigma must be positive, got {blur_sigma}.")
    if attention.ndim == 3:
        height, width = int(attention.shape[1]), int(attention.shape[2])
        if grid_size is not None and tuple(grid_size) != (height, width):
            raise ValueError(
                f"grid_size {tuple(grid_size)} does not match the attention map "
                f"shape {tuple(attention.shape)}."
            )
    elif attention.ndim == 2:
        if grid_size is None:
            raise ValueError(
                "grid_size=(H, W) is required for attention of shape (B, N), got "
                f"shape {tuple(attention.shape)}."
            )
        height, width = int(grid_size[0]), int(grid_size[1])
        if height * width != attention.shape[1]:
            raise ValueError(
                f"grid_size {tuple(grid_size)} has {height * width} cells but the "
                f"attention has shape {tuple(attention.shape)}."
            )
    else:
        raise ValueError(
            "attention must have shape (B, N) or (B, H, W), got shape "
            f"{tuple(attention.shape)}."
        )

    batch_size = attention.shape[0]
    att = attention.detach().reshape(batch_size, 1, height, width)
    if att.dtype not in (torch.float32, torch.float64):
        att = att.float()
    kernel_size = min(blur_kernel_size, 2 * min(height, width) - 1)
    if kernel_size > 1 and batch_size > 0:
        from torchvision.transforms.functional import gaussian_blur

        att = gaussian_blur(
            att, kernel_size=[kernel_size, kernel_size], sigma=[blur_sigma, blur_sigma]
        )
    flat = att.reshape(batch_size, height * width).double()
    values, order = torch.sort(flat, dim=1, descending=True)
    total = values.sum(dim=1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    mass = values / total
    # Keep a patch if the mass of all patches with higher attention is below
    # keep_mass, i.e. the smallest prefix that reaches keep_mass (up to a 1e-6
    # tolerance against rounding).
    mass_before = torch.cumsum(mass, dim=1) - mass
    keep_sorted = mass_before < keep_mass - _MASS_TOLERANCE
    mask = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return mask.reshape(batch_size, height, width)


# ---------------------------------------------------------------------------
# Spherical k-means
# ---------------------------------------------------------------------------


def _max_similarity(
    x: Tensor, centers: Tensor, chunk_size: int = 65536
) -> tuple[Tensor, Tensor]:
    """Returns the highest cosine similarity and its center index for each row."""
    sims = []
    indices = []
    for start in range(0, x.shape[0], chunk_size):
        s, i = (x[start : start + chunk_size] @ centers.T).max(dim=1)
        sims.append(s)
        indices.append(i)
    return torch.cat(sims), torch.cat(indices)


def _kmeans_plus_plus_init(
    x: Tensor, num_clusters: int, generator: torch.Generator | None
) -> Tensor:
    """k-means++ seeding with the cosine distance 1 - cos on unit vectors."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device="cpu"))
    chosen = [first]
    min_dist = (1.0 - x @ x[first]).clamp_min(0.0)
    for _ in range(1, num_clusters):
        weights = min_dist.double().cpu() ** 2
        if float(weights.sum()) <= 0.0:
            # Fewer distinct points than clusters: pick uniformly at random.
            idx = int(torch.randint(n, (1,), generator=generator, device="cpu"))
        else:
            idx = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(idx)
        min_dist = torch.minimum(min_dist, (1.0 - x @ x[idx]).clamp_min(0.0))
    return x[torch.tensor(chosen, device=x.device)].clone()


def spherical_kmeans(
    x: Tensor,
    num_clusters: int,
    num_iters: int = 300,
    generator: torch.Generator | None = None,
    tol: float = 0.0,
    init: str = "k-means++",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Spherical k-means (k-means with cosine similarity on L2-normalised vectors).

    The rows of ``x`` are L2-normalised; centers are unit vectors. Each iteration
    assigns every point to the center of highest cosine similarity and sets each
    center to the normalised sum of its points. The objective
    ``mean_i (1 - cos(x_i, c_{a_i}))`` never increases: the center update maximises
    the within-cluster cosine sum and the assignment picks the best center.

    Empty clusters are re-seeded with the points that are currently worst fitted
    (lowest similarity to their center, distinct points), which cannot increase the
    objective. CoTAP [0] uses this (with random re-seeding) to initialise the object
    prototypes from a memory bank of pooled block features.

    Args:
        x: Points. Shape: (N, d).
        num_clusters: Number of clusters K, 1 <= K <= N.
        num_iters: Maximum number of (update, assignment) iterations. 0 returns the
            initial centers.
        generator: Optional random generator (CPU) for a reproducible seeding.
        tol: Stop when the objective improves by no more than ``tol``. Iteration
            also stops when the assignments no longer change.
        init: "k-means++" (default, D^2 seeding with the cosine distance) or
            "random" (K distinct random points, as in the official CoTAP code).
        progress: Show a tqdm progress bar.

    Returns:
        Tuple ``(centers, assignments)`` with unit-norm centers of shape (K, d) in the
        dtype of ``x`` and the cluster index of every point, shape (N,), dtype long.

    Raises:
        ValueError: If ``x`` is not 2D, contains non-finite values, or the arguments
            are invalid.
    """
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, d), got shape {tuple(x.shape)}.")
    n, d = x.shape
    if num_clusters < 1 or num_clusters > n:
        raise ValueError(
            f"num_clusters must be in [1, N] = [1, {n}], got {num_clusters}."
        )
    if num_iters < 0:
        raise ValueError(f"num_iters must be non-negative, got {num_iters}.")
    if tol < 0:
        raise ValueError(f"tol must be non-negative, got {tol}.")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values.")

    with torch.no_grad():
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xn = F.normalize(x.detach().to(compute_dtype), dim=1)
        if init == "random":
            perm = torch.randperm(n, generator=generator, device="cpu")[:num_clusters]
            centers = xn[perm.to(xn.device)].clone()
        else:
            centers = _kmeans_plus_plus_init(xn, num_clusters, generator)
        best_sim, assignments = _max_similarity(xn, centers)
        objective = float((1.0 - best_sim).mean())

        iterator: Any = range(num_iters)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="spherical k-means")
        for _ in iterator:
            # Update step.
            sums = torch.zeros_like(centers).index_add_(0, assignments, xn)
            counts = torch.bincount(assignments, minlength=num_clusters)
            norms = sums.norm(dim=1, keepdim=True)
            # A cluster whose points sum to ~0 keeps its center (every unit vector is
            # equally good for it).
            valid = (counts > 0) & (norms.squeeze(1) > 1e-12)
            new_centers = torch.where(
                valid[:, None], sums / norms.clamp_min(1e-12), centers
            )
            empty = torch.nonzero(counts == 0).flatten()
            if empty.numel() > 0:
                # Re-seed empty clusters with the worst-fitted points.
                worst = torch.argsort(best_sim)[: empty.numel()]
                new_centers[empty] = xn[worst]
            centers = new_centers

            # Assignment step.
            new_best_sim, new_assignments = _max_similarity(xn, centers)
            new_objective = float((1.0 - new_best_sim).mean())
            unchanged = bool(torch.equal(new_assignments, assignments))
            improvement = objective - new_objective
            best_sim, assignments, objective = (
                new_best_sim,
                new_assignments,
                new_objective,
            )
            if unchanged or improvement <= tol:
                break

    return centers.to(x.dtype), assignments


def spherical_kmeans_objective(x: Tensor, centers: Tensor) -> Tensor:
    """Spherical k-means objective ``mean_i (1 - max_k cos(x_i, c_k))``.

    Args:
        x: Points. Shape: (N, d).
        centers: Centers. Shape: (K, d).

    Returns:
        Scalar objective (lower is better).
    """
    sims = F.normalize(x, dim=1) @ F.normalize(centers, dim=1).T
    return (1.0 - sims.max(dim=1).values).mean()


# ---------------------------------------------------------------------------
# Checkpoint loading and key mapping
# ---------------------------------------------------------------------------

#: Key every supported ViT checkpoint contains (after its prefix).
_ANCHOR_KEY = "patch_embed.proj.weight"
#: Prefix of the object-aware filter's keys in the canonical (exported) format.
FILTER_PREFIX = "filter."
_OFFICIAL_FILTER_NORM = re.compile(
    r"^blocks\.(\d+)\.(norm_in|norm_out_patch|norm_out_cls)\.(.+)$"
)


@dataclass
class CheckpointLoadReport:
    """What happened when a checkpoint was loaded into a model.

    Attributes:
        prefix: The key prefix that was stripped from the checkpoint (e.g.
            "teacher.backbone." is reported as the sub-dict name plus prefix).
        loaded_keys: Model keys that received a value from the checkpoint.
        missing_keys: Model keys that the checkpoint did not provide.
        unexpected_keys: Checkpoint keys (canonical names) that the model does not
            know and that are not in ``ignored_keys``.
        ignored_keys: Checkpoint keys that were deliberately not loaded, mapped to the
            reason (e.g. classifier heads, the final norm that CoTAP drops, the
            teacher copy of a student/teacher checkpoint). Keys outside the selected
            backbone are named ``"<sub-dict>:<original key>"`` (e.g.
            ``"state_dict:net_teacher.model.kernel"``), keys inside it by their
            canonical (timm / ``filter.*``) name.
        resampled_keys: Keys whose value was resampled to the model's shape (the
            position embedding for another image size).
        resampled_grids: For each resampled key, the patch grids ``(H, W)`` of the
            checkpoint and of the model.
    """

    prefix: str = ""
    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: dict[str, str] = field(default_factory=dict)
    resampled_keys: list[str] = field(default_factory=list)
    resampled_grids: dict[str, tuple[tuple[int, int], tuple[int, int]]] = field(
        default_factory=dict
    )

    def resample_note(self) -> str | None:
        """One line naming the from / to grids of the resampled keys, or None."""
        if not self.resampled_grids:
            return None
        parts = [
            f"{key} resampled from the checkpoint's {old[0]}x{old[1]} patch grid to "
            f"{new[0]}x{new[1]}"
            for key, (old, new) in self.resampled_grids.items()
        ]
        return "; ".join(parts) + " (bicubic, timm's resample_abs_pos_embed)"

    def summary(self) -> str:
        """Returns a human-readable multi-line summary."""
        lines = [
            f"prefix: {self.prefix!r}",
            f"loaded: {len(self.loaded_keys)} keys",
            f"missing: {self.missing_keys}",
            f"unexpected: {self.unexpected_keys}",
            f"resampled: {self.resampled_keys}",
            f"ignored: {len(self.ignored_keys)} keys",
        ]
        note = self.resample_note()
        if note is not None:
            lines.insert(5, f"  {note}")
        reasons: dict[str, list[str]] = {}
        for key, reason in self.ignored_keys.items():
            reasons.setdefault(reason, []).append(key)
        for reason, keys in reasons.items():
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            lines.append(f"  {len(keys)} x {reason}: {shown}")
        return "\n".join(lines)


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be loaded, with what is wrong with it.

    Attributes:
        path: The file.
        problem: What is wrong (empty, truncated, not a checkpoint, or pickled
            objects that safe loading refuses), without advice.
        needs_unsafe_load: True if the file is a checkpoint that only
            ``weights_only=False`` can load (it holds pickled Python objects).
    """

    def __init__(self, path: str, problem: str, needs_unsafe_load: bool = False):
        """Initializes the error.

        Args:
            path: The file.
            problem: What is wrong with it.
            needs_unsafe_load: Whether only ``weights_only=False`` loads it.
        """
        self.path = path
        self.problem = problem
        self.needs_unsafe_load = needs_unsafe_load
        advice = (
            "; load it with weights_only=False only if you trust its source"
            if needs_unsafe_load
            else ""
        )
        super().__init__(f"{path}: {problem}{advice}")


class CheckpointMismatchError(ValueError):
    """Checkpoint weights that do not fit the model (shapes or, strictly, keys)."""


def _blocked_global(message: str) -> str:
    """The object named in torch's 'Weights only load failed' message."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return match.group(1) if match else "unsupported object"


def load_checkpoint_file(
    path: str | os.PathLike[str], weights_only: bool = True
) -> dict[str, Any]:
    """Loads a checkpoint file on the CPU without network access.

    Uses ``torch.load(weights_only=True)`` by default (``argparse.Namespace`` is
    allowed, as in DINO/iBOT training checkpoints). Files that need arbitrary
    pickled objects (some Lightning ``.ckpt`` hyper-parameters) raise a
    :class:`CheckpointFileError` that names the blocked object; pass
    ``weights_only=False`` only for files you trust. Empty, truncated and non-torch
    files raise a :class:`CheckpointFileError` that says so (not torch's reader
    error).

    Args:
        path: Path to a ``.pth`` / ``.pt`` / ``.ckpt`` file.
        weights_only: Restrict unpickling to tensors and primitive types.

    Returns:
        The loaded checkpoint dict.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointFileError: If the file is empty, damaged, not a checkpoint, holds
            objects that safe loading refuses, or does not hold a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFileError(path, "empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive ("PK"), or a pickle (protocol opcode 0x80).
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointFileError(
            path, "not a PyTorch checkpoint (not written by torch.save)"
        )
    try:
        if weights_only:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except pickle.UnpicklingError as ex:
        if "Unsupported global" in str(ex):
            raise CheckpointFileError(
                path,
                f"holds pickled Python objects ({_blocked_global(str(ex))}) that "
                "safe loading (weights_only=True) refuses",
                needs_unsafe_load=True,
            ) from ex
        raise CheckpointFileError(
            path, "not a PyTorch checkpoint (not written by torch.save)"
        ) from ex
    except (EOFError, RuntimeError) as ex:
        # torch's zip reader ("failed finding central directory") or the legacy
        # unpickler stopped before the end of the data: the file is cut short.
        raise CheckpointFileError(
            path,
            f"truncated or damaged ({size} bytes, the data ends early or is "
            "corrupt); copy, download or export it again",
        ) from ex
    except (KeyError, ValueError, AttributeError, ImportError) as ex:
        raise CheckpointFileError(
            path, "not a PyTorch checkpoint (not written by torch.save)"
        ) from ex
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFileError(
            path, f"must contain a dict, got {type(checkpoint).__name__}"
        )
    return dict(checkpoint)


def _unwrap_checkpoint(
    checkpoint: Mapping[str, Any], checkpoint_key: str | None
) -> tuple[Mapping[str, Any], str]:
    """Selects the sub-dict of a checkpoint that holds the weights."""
    if checkpoint_key is not None:
        if checkpoint_key not in checkpoint or not isinstance(
            checkpoint[checkpoint_key], Mapping
        ):
            raise ValueError(
                f"checkpoint_key {checkpoint_key!r} is not a dict in the checkpoint; "
                f"top-level keys: {sorted(checkpoint)[:20]}."
            )
        return checkpoint[checkpoint_key], f"{checkpoint_key}:"
    # Lightning / official CoTAP / lightly-cotap export -> "state_dict";
    # DINO / iBOT training checkpoints -> "teacher" (DINO's default checkpoint_key);
    # DeiT / MAE / timm training -> "model".
    for key in ("state_dict", "teacher", "model", "module"):
        value = checkpoint.get(key)
        if isinstance(value, Mapping) and any(
            isinstance(v, Tensor) for v in value.values()
        ):
            return value, f"{key}:"
    return checkpoint, ""


def _select_prefix(keys: list[str], prefix: str | None) -> str:
    """Finds the prefix in front of the ViT keys (e.g. 'teacher.backbone.')."""
    candidates = sorted(
        {k[: -len(_ANCHOR_KEY)] for k in keys if k.endswith(_ANCHOR_KEY)}
    )
    if prefix is not None:
        if prefix not in candidates:
            raise ValueError(
                f"prefix {prefix!r} does not hold a ViT backbone; candidates found "
                f"(prefixes of '{_ANCHOR_KEY}'): {candidates}."
            )
        return prefix
    if not candidates:
        raise ValueError(
            f"No ViT backbone found in the checkpoint: no key ends with "
            f"'{_ANCHOR_KEY}'. First keys: {keys[:10]}."
        )
    if len(candidates) == 1:
        return candidates[0]
    students = [c for c in candidates if "student" in c]
    non_teacher = [
        c for c in candidates if "teacher" not in c and not c.startswith("net_teacher")
    ]
    if len(students) == 1:
        return students[0]
    if len(non_teacher) == 1:
        return non_teacher[0]
    raise ValueError(
        f"The checkpoint holds several ViT backbones with prefixes {candidates}; "
        "pass prefix=... to choose one."
    )


def extract_backbone_state_dict(
    checkpoint: Mapping[str, Any],
    prefix: str | None = None,
    checkpoint_key: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """Extracts a canonical backbone state dict from any supported checkpoint.

    The canonical format is the one :func:`lightly_cotap.export.export_backbone`
    writes: plain timm ``VisionTransformer`` keys (``patch_embed.proj.weight``,
    ``blocks.0.attn.qkv.weight``, ...) plus ``filter.*`` keys of the object-aware
    filter. Supported inputs:

    - timm ``state_dict`` and DINO/iBOT backbone weights (same key names as timm);
    - DINO/iBOT training checkpoints (``teacher`` sub-dict by default, keys with
      ``backbone.`` / ``module.`` prefixes);
    - official CoTAP checkpoints (Lightning ``state_dict`` with ``net.model.*``
      student and ``net_teacher.model.*`` teacher keys; ``kernel`` and the last
      block's ``norm_in`` / ``norm_out_*`` become ``filter.*``);
    - lightly-cotap exports and Lightning ``.ckpt`` files whose modules hold a
      :class:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer` (e.g.
      ``student_backbone.vit.*`` and ``student_backbone.filter.*``).

    With several backbones (student and teacher) in one dict, the one whose prefix
    contains "student" (or the only one without "teacher") is used, like the
    official CoTAP evaluation; pass ``prefix`` to choose explicitly.

    Args:
        checkpoint: The loaded checkpoint.
        prefix: Key prefix of the backbone inside the (unwrapped) dict, e.g.
            "backbone." or "student_backbone.vit.". Auto-detected if None.
        checkpoint_key: Top-level sub-dict to use (e.g. "student" for a DINO
            checkpoint). Auto-detected if None.

    Returns:
        Tuple ``(state_dict, ignored, used_prefix)``: the canonical state dict, the
        dict of ignored source keys with reasons, and a description of the prefix.

    Raises:
        ValueError: If no (unique) backbone can be found.
    """
    weights, container = _unwrap_checkpoint(checkpoint, checkpoint_key)
    keys = [k for k, v in weights.items() if isinstance(v, Tensor)]
    ignored: dict[str, str] = {
        f"{container}{k}": "not a tensor"
        for k, v in weights.items()
        if not isinstance(v, Tensor)
    }
    if container:
        for k in checkpoint:
            if f"{k}:" != container:
                ignored[k] = f"top-level entry other than {container[:-1]!r}"
    chosen = _select_prefix(keys, prefix)
    # A lightly-cotap model stores the timm ViT under '<root>vit.' and the filter
    # under '<root>filter.'.
    root = chosen[: -len("vit.")] if chosen.endswith("vit.") else None
    # Layout of the official CoTAP ViT: last block index to map the filter norms.
    depth = 1 + max(
        (
            int(m.group(1))
            for k in keys
            if k.startswith(chosen)
            and (m := re.match(r"^blocks\.(\d+)\.", k[len(chosen) :])) is not None
        ),
        default=-1,
    )

    out: dict[str, Tensor] = {}
    for key in keys:
        value = weights[key]
        if root is not None and key.startswith(root + FILTER_PREFIX):
            out[key[len(root) :]] = value
            continue
        if not key.startswith(chosen):
            ignored[f"{container}{key}"] = f"outside the selected backbone {chosen!r}"
            continue
        name = key[len(chosen) :]
        if name == "kernel":  # official CoTAP prototypes
            out[FILTER_PREFIX + "prototypes"] = value
            continue
        match = _OFFICIAL_FILTER_NORM.match(name)
        if match is not None:
            if int(match.group(1)) == depth - 1:
                out[f"{FILTER_PREFIX}{match.group(2)}.{match.group(3)}"] = value
            else:
                ignored[f"{container}{key}"] = (
                    "official CoTAP filter norm of a block without the filter (unused)"
                )
            continue
        out[name] = value
    if (
        FILTER_PREFIX + "prototypes" in out
        and FILTER_PREFIX + "prototypes_initialized" not in out
    ):
        # Prototypes stored in a checkpoint are trained / k-means initialised.
        out[FILTER_PREFIX + "prototypes_initialized"] = torch.tensor(True)
    return out, ignored, f"{container}{chosen}"


def architecture_from_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The architecture fields that a canonical backbone state dict reveals.

    For checkpoints without ``meta`` (timm / DINO / iBOT weights): the fields of
    :meth:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer.get_meta` that
    the tensor shapes determine. ``num_heads`` and ``no_embed_class`` cannot be
    read from shapes, and ``use_filter`` is only reported when the filter keys are
    present (a plain ViT checkpoint also starts a model with a new filter).

    Args:
        state_dict: Output of :func:`extract_backbone_state_dict`.

    Returns:
        A partial meta dict (empty if there is no patch embedding).
    """
    proj = state_dict.get(_ANCHOR_KEY)
    if proj is None or proj.ndim != 4:
        return {}
    width = int(proj.shape[0])
    blocks = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))
    }
    out: dict[str, Any] = {"embed_dim": width, "patch_size": int(proj.shape[-1])}
    if blocks:
        out["depth"] = max(blocks) + 1
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        out["mlp_ratio"] = float(fc1.shape[0]) / width
    if "blocks.0.attn.qkv.weight" in state_dict:
        out["qkv_bias"] = "blocks.0.attn.qkv.bias" in state_dict
        out["layer_scale"] = "blocks.0.ls1.gamma" in state_dict
    reg = state_dict.get("reg_token")
    out["num_reg_tokens"] = int(reg.shape[1]) if reg is not None else 0
    prototypes = state_dict.get(FILTER_PREFIX + "prototypes")
    if prototypes is not None and prototypes.ndim == 4:
        out["use_filter"] = True
        out["num_prototypes"] = int(prototypes.shape[0])
        out["prototype_size"] = int(prototypes.shape[-1])
    return out


#: Canonical keys that are deliberately not loaded, with the reason.
_IGNORABLE = (
    (re.compile(r"^head(\.|$)|^head_drop\."), "classifier / projection head"),
    (re.compile(r"^projection_heads\."), "official CoTAP projection heads"),
    (re.compile(r"^(masked_embed|mask_token)$"), "iBOT / DINOv2 mask token"),
)


def load_backbone_state_dict(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    strict: bool = True,
    prefix: str | None = None,
    checkpoint_key: str | None = None,
    resample_pos_embed: bool = True,
) -> CheckpointLoadReport:
    """Loads a checkpoint into a CoTAPVisionTransformer-like model.

    ``model`` must expose the timm ViT as ``model.vit`` and, if it uses the filter,
    the filter as ``model.filter`` (as
    :class:`~lightly_cotap.models.cotap_vit.CoTAPVisionTransformer` does). Nothing is
    dropped silently: every checkpoint key is either loaded, listed in
    ``unexpected_keys`` or listed with a reason in ``ignored_keys``.

    Rules:

    - Shape mismatches always raise, naming every key with both shapes, except for
      the position embedding of a checkpoint trained at another image size, which
      is resampled (bicubic, timm's ``resample_abs_pos_embed``) when
      ``resample_pos_embed`` is True.
    - With ``strict=True``, unexpected keys and missing keys raise. Missing filter
      keys are allowed when the checkpoint has no filter keys at all (the usual
      CoTAP start from a DINO/iBOT backbone: the filter is new).
    - The final ``norm.*`` of a checkpoint is ignored when the model uses the filter
      (CoTAP's ViT has no final norm).

    Args:
        model: The model to load into.
        checkpoint: A loaded checkpoint (see :func:`extract_backbone_state_dict`).
        strict: Raise on missing or unexpected keys.
        prefix: Backbone key prefix; auto-detected if None.
        checkpoint_key: Top-level sub-dict; auto-detected if None.
        resample_pos_embed: Resample a position embedding of another grid size.

    Returns:
        A :class:`CheckpointLoadReport`.

    Raises:
        CheckpointMismatchError: On shape mismatches, or (strict) missing /
            unexpected keys.
    """
    source, ignored, used_prefix = extract_backbone_state_dict(
        checkpoint, prefix=prefix, checkpoint_key=checkpoint_key
    )
    vit = model.vit
    has_filter = getattr(model, "filter", None) is not None
    target = model.state_dict()
    report = CheckpointLoadReport(prefix=used_prefix, ignored_keys=ignored)

    mapped: dict[str, Tensor] = {}
    mismatches: list[str] = []
    for name, value in source.items():
        target_name = name if name.startswith(FILTER_PREFIX) else "vit." + name
        if target_name not in target:
            reason = None
            for pattern, why in _IGNORABLE:
                if pattern.match(name):
                    reason = why
            if reason is None and has_filter and re.match(r"^norm\.", name):
                reason = "final norm (unused with the object-aware filter)"
            if reason is None and re.match(r"^fc_norm\.", name):
                reason = "pooled-feature norm of the classifier"
            if reason is None:
                report.unexpected_keys.append(name)
            else:
                report.ignored_keys[name] = reason
            continue
        expected = target[target_name]
        if value.shape != expected.shape:
            if (
                name == "pos_embed"
                and resample_pos_embed
                and value.ndim == 3
                and value.shape[-1] == expected.shape[-1]
            ):
                resampled = _resample_pos_embed(vit, value, expected)
                if resampled is not None:
                    report.resampled_keys.append(name)
                    report.resampled_grids[name] = resampled[1]
                    mapped[target_name] = resampled[0]
                    continue
            mismatches.append(
                f"{name}: checkpoint shape {tuple(value.shape)} vs model shape "
                f"{tuple(expected.shape)}"
            )
            continue
        mapped[target_name] = value
    if mismatches:
        raise CheckpointMismatchError(
            "Checkpoint does not fit the model architecture (another ViT size, "
            "patch size or number of prototypes?):\n  " + "\n  ".join(mismatches)
        )

    missing = [k for k in target if k not in mapped]
    report.missing_keys = [
        k if k.startswith(FILTER_PREFIX) else k[len("vit.") :] for k in missing
    ]
    report.loaded_keys = sorted(mapped)
    if strict:
        checkpoint_has_filter = any(k.startswith(FILTER_PREFIX) for k in source)
        fatal_missing = [
            k
            for k in report.missing_keys
            if checkpoint_has_filter or not k.startswith(FILTER_PREFIX)
        ]
        if fatal_missing or report.unexpected_keys:
            raise CheckpointMismatchError(
                "Checkpoint keys do not match the model (strict=True):\n"
                f"  missing in checkpoint: {_summarize_keys(fatal_missing)}\n"
                "  unexpected in checkpoint: "
                f"{_summarize_keys(report.unexpected_keys)}\n"
                "Pass strict=False to load the matching keys only (the returned "
                "report lists every key)."
            )
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return report


def _summarize_keys(keys: list[str], max_block_keys: int = 3) -> list[str]:
    """Lists keys, collapsing blocks with many keys to 'blocks.N.* (n keys)'."""
    blocks = [re.match(r"^(blocks\.\d+\.)", key) for key in keys]
    counts = Counter(match.group(1) for match in blocks if match is not None)
    out: list[str] = []
    done: set[str] = set()
    for key, match in zip(keys, blocks):
        if match is None or counts[match.group(1)] <= max_block_keys:
            out.append(key)
        elif match.group(1) not in done:
            done.add(match.group(1))
            out.append(f"{match.group(1)}* ({counts[match.group(1)]} keys)")
    return out


def _resample_pos_embed(
    vit: Any, value: Tensor, expected: Tensor
) -> tuple[Tensor, tuple[tuple[int, int], tuple[int, int]]] | None:
    """Resamples a position embedding to the model's grid, or None if impossible.

    Returns:
        The resampled embedding and the ``(old, new)`` patch grids.
    """
    from timm.layers import resample_abs_pos_embed

    num_prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    old_patches = value.shape[1] - num_prefix
    new_patches = expected.shape[1] - num_prefix
    old_side = math.isqrt(old_patches)
    if old_side * old_side != old_patches or new_patches <= 0:
        return None
    new_size = tuple(vit.patch_embed.grid_size)
    if new_size[0] * new_size[1] != new_patches:
        return None
    resampled: Tensor = resample_abs_pos_embed(
        value,
        new_size=list(new_size),
        old_size=[old_side, old_side],
        num_prefix_tokens=num_prefix,
        verbose=False,
    )
    grids = ((old_side, old_side), (int(new_size[0]), int(new_size[1])))
    return resampled.to(expected.dtype), grids
