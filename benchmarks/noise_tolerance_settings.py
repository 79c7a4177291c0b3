"""Settings of the noise-tolerance benchmark: criteria, noise levels, shares, sizes."""

from __future__ import annotations

from dataclasses import dataclass

TEACHER_DIM = 16
#: alpha: the largest blend of a patch's teacher feature with a confusing class.
NOISE_LEVELS: dict[str, float] = {
    "none": 0.0,
    "medium": 0.6,
    "heavy": 0.8,
    "very heavy": 1.0,
}
JITTER = 0.05
#: Same-class patches among the top_k selected cells of x+ (share = m / 20).
POSITIVE_CELLS: dict[str, int] = {"50%": 10, "25%": 5, "10%": 2, "5%": 1}
IMBALANCE_NOISE = "medium"
NUM_NEGATIVES = 1
TEMPERATURE = 0.1
LRS = (3e-4, 1e-3, 3e-3)
SWEEP_SEED = 100
LABELS = {
    "continuous_ap": "ContinuousAPLoss (CoTAP)",
    "hinge_ap": "HingeContinuousAPLoss",
    "binary_ap": "BinaryAPLoss, calibrated threshold",
    "mse": "SimilarityMSELoss",
    "kl": "SimilarityKLLoss",
    "stego": "STEGOCorrelationLoss, calibrated shift",
    "infonce": "TopKInfoNCELoss, calibrated k",
    "binary_ap_fixed": "BinaryAPLoss, threshold 0.5",
    "stego_fixed": "STEGOCorrelationLoss, shift 0.5",
    "infonce_fixed": "TopKInfoNCELoss, k = half the list",
}
CRITERIA = tuple(LABELS)
#: The calibrated criterion whose learning rate a fixed-decision variant reuses.
LR_SOURCE = {name: name.removesuffix("_fixed") for name in CRITERIA}
REFERENCE = "continuous_ap"
LR_SOURCE_ORDER = sorted(set(LR_SOURCE.values()), key=list(LABELS).index)


@dataclass
class Config:
    """Sizes of one benchmark run."""

    scene_size: int = 96
    patch_size: int = 8
    objects_per_class: int = 3
    object_scale: tuple[float, float] = (0.5, 0.9)
    num_train: int = 512
    num_probe: int = 64
    num_test: int = 64
    purity: float = 0.75
    top_k: int = 10
    steps: int = 200
    weight_decay: float = 1e-4
    probe_steps: int = 100
    label_size: int = 48
    kmeans_n_init: int = 2
    diagnostic_batches: int = 10


QUICK = Config(
    num_train=64,
    num_probe=8,
    num_test=8,
    steps=3,
    probe_steps=5,
    kmeans_n_init=1,
    diagnostic_batches=2,
)


@dataclass(frozen=True)
class Setting:
    """One point of a curve: a noise level and a share of same-class pairs."""

    noise: str
    share: str
    axis: str

    @property
    def name(self) -> str:
        return f"noise={self.noise}, share={self.share}"


def all_settings() -> list[Setting]:
    """The noise axis at 50 % same-class pairs, then the rest of the imbalance axis."""
    noise_axis = [Setting(level, "50%", "noise") for level in NOISE_LEVELS]
    imbalance_axis = [
        Setting(IMBALANCE_NOISE, share, "imbalance")
        for share in POSITIVE_CELLS
        if share != "50%"
    ]
    return noise_axis + imbalance_axis


CLEAN = Setting("none", "50%", "noise")


def criterion_settings(name: str, settings: list[Setting]) -> list[Setting]:
    """The settings a criterion runs on.

    A fixed-decision variant runs only where its decision differs from the
    calibrated one: InfoNCE's half-the-list ``top_k`` is exact at 50 % same-class
    pairs, and the 0.5 threshold / shift is within 0.03 of the midpoint without
    noise.
    """
    if name == "infonce_fixed":
        return [s for s in settings if s.share != "50%"]
    if name.endswith("_fixed"):
        return [s for s in settings if s.noise != "none"]
    return settings


def axis_points(settings: list[Setting], axis: str) -> list[Setting]:
    """Settings of one curve in order (the imbalance curve starts at 50 %)."""
    if axis == "noise":
        return [s for s in settings if s.axis == "noise"]
    balanced = [s for s in settings if s.noise == IMBALANCE_NOISE and s.share == "50%"]
    return balanced + [s for s in settings if s.axis == "imbalance"]
