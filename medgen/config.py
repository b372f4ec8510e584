"""Configs are data: YAML files loaded into pydantic models that refuse unknown keys and bad values.

Later stages (training, generation, the gate) add their sections beside `ingest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medgen.errors import ConfigError

# Network widths: bounded, so a model folder's metadata cannot ask for a network of any size.
Channels = Annotated[tuple[Annotated[int, Field(ge=1, le=2048)], ...], Field(min_length=1, max_length=8)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(_Strict):
    sources: list[Path] = Field(min_length=1)
    out: Path
    workers: int = Field(1, ge=1, le=256)
    frames: Literal["error", "split"] = "error"
    localizers: Literal["drop", "error"] = "drop"
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: str = "medgen"
    # Per-scan ceiling on voxels (all frames), checked on what a header claims before anything is
    # allocated: 2**27 = 512^3, about 0.5 GiB as float32. Raise it for whole-body CT.
    max_voxels: int = Field(2**27, ge=1, le=2**33)
    # Pseudonym salt. None (the default for real data): a secret kept in OUT/.medgen/salt or
    # $MEDGEN_SUBJECT_SALT. Only data that are not patients (the demo) may name one in a config.
    salt: str | None = None

    @field_validator("split")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0 or sum(v) <= 0:
            raise ValueError("split fractions must be >= 0 and not all zero")
        return v


Split = Literal["train", "val", "test"]


class IntensityConfig(_Strict):
    """How scanner units become model units ([out_min, out_max]); recorded so outputs map back.

    ct_window: fixed HU window [lower, upper] (clipped: lossless only inside the window).
    percentile: per-volume percentiles [lower, upper] (MR, arbitrary units).
    """

    kind: Literal["ct_window", "percentile"]
    lower: float
    upper: float
    out_min: float = 0.0
    out_max: float = 1.0

    @field_validator("upper")
    @classmethod
    def _ordered(cls, v: float, info) -> float:
        if "lower" in info.data and v <= info.data["lower"]:
            raise ValueError("upper must be greater than lower")
        return v


class DataConfig(_Strict):
    """Which manifest rows train a model, and the geometry/intensity space they are mapped into."""

    modality: str | None = None  # keep rows of this modality ('MR', 'CT'); None keeps all
    include: list[str] = ["*"]  # fnmatch patterns over the manifest's `source`
    splits: list[Split] = ["train"]
    val_splits: list[Split] = ["val"]
    spacing: tuple[float, float, float]  # mm, RAS
    size: tuple[int, int, int]  # voxels after crop/pad
    intensity: IntensityConfig
    num_workers: int = Field(0, ge=0)  # DataLoader workers (spawned: safe inside threaded hosts)

    @field_validator("spacing")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("spacing must be positive")
        return v


class StageTrainConfig(_Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(1, ge=1)  # per process
    lr: float = Field(1e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    amp: Literal["auto", "bf16", "fp16", "fp32", "none"] = (
        "auto"  # medgen.models.precision: auto = bf16 on CUDA, fp32 on CPU
    )
    ema_decay: float | None = Field(None, ge=0, lt=1)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    val_every: int = Field(0, ge=0)  # 0: validate only at the end
    nan_limit: int = Field(10, ge=0)  # skipped non-finite steps tolerated before aborting
    seed: int = 0


class PerceptualConfig(_Strict):
    """A feature network that exists on disk (TorchScript); nothing is ever downloaded."""

    torchscript: Path
    weight: float = Field(gt=0)


class AutoencoderNetworkConfig(_Strict):
    """The KL autoencoder's architecture: all a model folder needs to rebuild it (no training section)."""

    channels: Channels = (32, 64, 64)
    latent_channels: int = Field(3, ge=1, le=64)
    num_res_blocks: int = Field(1, ge=1, le=8)
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = Field(16, ge=1, le=128)
    nonlocal_attention: bool = False  # MONAI's encoder/decoder mid-block attention (costly at 3D)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @classmethod
    def from_metadata(cls, recorded: dict) -> "AutoencoderNetworkConfig":
        """A generator's metadata records the autoencoder's training weights (kl, adversarial) beside its
        architecture; the network is built from the architecture's fields alone."""
        return cls.model_validate({k: v for k, v in recorded.items() if k in cls.model_fields})


class AutoencoderConfig(AutoencoderNetworkConfig):
    """The autoencoder training stage: its network plus the losses and the training loop's settings."""

    kl_weight: float = Field(1e-6, ge=0)
    adv_weight: float = Field(0.0, ge=0)  # 0 disables the PatchGAN term
    adv_start: int = Field(0, ge=0)  # warm-up: steps of L1 + KL before the adversarial term
    disc_channels: int = Field(32, ge=1)
    disc_layers: int = Field(3, ge=1)
    disc_lr: float = Field(1e-4, gt=0)
    perceptual: PerceptualConfig | None = None
    train: StageTrainConfig


class ConditioningConfig(_Strict):
    """Conditioned generation: which declared covariates (the `covariates` section) the diffusion
    UNet is given, by cross-attention on one encoded vector (medgen.models.conditions).

    `dropout`: the probability that a training sample is shown no condition at all (what
    classifier-free guidance contrasts with); `column_dropout`: that one column is hidden, so a
    sample can be asked for with some columns left open ("sex F", any age)."""

    columns: list[str] = Field(min_length=1)
    dropout: float = Field(0.15, ge=0, lt=1)
    column_dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _unique(self) -> "ConditioningConfig":
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("diffusion.conditioning.columns: a column is named twice")
        return self


class DiffusionNetworkConfig(_Strict):
    """The latent diffusion UNet and its noise schedule: what sampling needs, no training section."""

    scheduler: Literal["ddpm", "ddim", "rflow"] = "ddpm"  # ddpm/ddim train alike; rflow is rectified flow
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"  # ignored by rflow (velocity)
    num_train_timesteps: int = Field(1000, ge=10, le=10000)
    beta_schedule: Literal["linear_beta", "scaled_linear_beta"] = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    channels: Channels = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = Field(1, ge=1, le=8)
    num_head_channels: int = Field(8, ge=1, le=512)
    norm_num_groups: int = Field(16, ge=1, le=128)
    conditioning: ConditioningConfig | None = None


class DiffusionConfig(DiffusionNetworkConfig):
    """The diffusion training stage: the network and schedule plus the training loop's settings."""

    train: StageTrainConfig


class ControlNetConfig(_Strict):
    """A ControlNet (MONAI) on a trained diffusion UNet: generation that follows a label map.

    The map enters one-hot (one channel per label of the training label table) at image
    resolution; `embedding_channels` are the conditioning encoder's levels, one more than the
    autoencoder's downsamplings so it lands on the latent grid. The UNet stays frozen."""

    embedding_channels: Channels = (16, 32)
    conditioning_scale: float = Field(1.0, gt=0)
    # MAISI's weighted loss: latent voxels that hold any of these labels count `weighted_loss`
    # times in the loss (a lesion of 0.5 % of the volume otherwise barely moves a ControlNet)
    weighted_loss_labels: list[int] = Field(default_factory=list)
    weighted_loss: float = Field(1.0, ge=1.0)
    train: StageTrainConfig


class GenerateConfig(_Strict):
    sampler: Literal["ddpm", "ddim", "rflow"] | None = None  # None: ddim (rflow for a rectified-flow model)
    steps: int = Field(50, ge=1)
    batch_size: int = Field(1, ge=1)
    decode_roi: tuple[int, int, int] | None = None  # latent window for sliding-window decoding
    n: int = Field(4, ge=1)  # volumes per synthesis run (pipeline)
    seed: int = 0
    chunk: int = Field(2, ge=1)  # volumes per generation task when the flow fans out
    condition: dict[str, str | float] | None = None  # a conditioned generator: e.g. {sex: F, age: 70}
    guidance: float = Field(1.0, ge=0)  # classifier-free guidance weight (1 = as trained, 0 = unconditional)
    controlnet: Path | None = None  # RUN/controlnet: samples follow `labels`, exported as image + label pairs
    # NIfTI label maps (model geometry, or any grid: resampled nearest): a file, a list, or a
    # folder of *_dseg.nii.gz; sample i follows map i mod k
    labels: Path | list[Path] | None = None
    mask_guidance: float = Field(1.0, ge=0)  # guidance on the label map (1 = as trained, more follows it harder)

    @model_validator(mode="after")
    def _pairs(self) -> "GenerateConfig":
        if (self.controlnet is None) != (self.labels is None):
            raise ValueError("generate.controlnet and generate.labels go together: set both, or neither")
        return self


class ScoreNetworkConfig(_Strict):
    """An image-space, noise-conditional score model (epsilon-predicting DiffusionModelUNet).

    Trained at noise-to-signal ratios sigma in [sigma_min, sigma_max] (intensities scaled so the
    99.5th percentile is 1); `linear_beta` reaches the low-noise end, `scaled_linear_beta` does not.
    """

    channels: Channels = (16, 32, 32)
    attention_levels: tuple[bool, ...] = (False, False, False)
    num_res_blocks: int = Field(1, ge=1, le=8)
    num_head_channels: int = Field(16, ge=1, le=512)
    norm_num_groups: int = Field(8, ge=1, le=128)
    num_train_timesteps: int = Field(1000, ge=10, le=10000)
    beta_schedule: Literal["linear_beta", "scaled_linear_beta"] = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sigma_min: float = Field(0.01, gt=0)
    sigma_max: float = Field(0.2, gt=0)
    patch: tuple[int, int, int] = (32, 32, 32)

    @model_validator(mode="after")
    def _check(self) -> "ScoreNetworkConfig":
        if self.sigma_max <= self.sigma_min:
            raise ValueError("sigma_max must be greater than sigma_min")
        down = 2 ** (len(self.channels) - 1)
        if any(p % down for p in self.patch):
            raise ValueError(f"patch {self.patch} must be divisible by the UNet's downsampling ({down})")
        if len(self.attention_levels) != len(self.channels) or any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(
                "attention_levels needs one entry per channels level, channels multiples of norm_num_groups"
            )
        return self


class DenoiseAugmentConfig(_Strict):
    """Random changes to each clean training patch (medgen.denoising.augment), so the prior covers
    scans unlike the few that ship: other contrasts, intensity scalings, coil bias, thick slices."""

    scale: tuple[float, float] = (0.8, 1.2)  # intensity multiplier range
    gamma: tuple[float, float] = (0.6, 1.6)  # contrast: x ** gamma, gamma log-uniform in the range
    invert: float = Field(0.25, ge=0, le=1)  # probability of inverted tissue contrast (T1 -> T2-like)
    bias: float = Field(0.2, ge=0)  # SD of a linear log-bias field's slope across the patch
    blur: float = Field(1.0, ge=0)  # up to this Gaussian SD (voxels) along one random axis
    p: float = Field(0.8, ge=0, le=1)  # probability that a patch is augmented at all


class DenoiserConfig(ScoreNetworkConfig):
    """The score model's training stage: the network plus the training loop's settings."""

    train: StageTrainConfig
    augment: DenoiseAugmentConfig | None = None


class SelfSupervisedConfig(_Strict):
    """Fine-tuning a score model on noisy scans alone (medgen.denoising.adapt, SURE loss).
    `init` is the model to start from (default: the one shipped with medgen); `sigma`, when the
    noise level of every scan is known (in the scans' units), else each scan's is estimated."""

    init: Path | None = None
    noise: Literal["gaussian", "rician"] = "gaussian"
    sigma: float | None = Field(None, gt=0)
    train: StageTrainConfig


class CovariateColumn(_Strict):
    """One declared column. Categorical: its levels (the table's spelling, case-sensitive).
    Continuous: its inclusive range. missing: 'error' refuses a missing cell, 'drop' leaves that
    subject's scans out (reported), 'impute' fills the median (continuous) or `fill` (categorical)."""

    name: str = Field(min_length=1)
    kind: Literal["categorical", "continuous"]
    levels: list[str] | None = None
    range: tuple[float, float] | None = None
    missing: Literal["error", "drop", "impute"] = "error"
    fill: str | None = None  # the level a missing categorical cell becomes with missing: impute
    # where the value comes from: the table, or the scan's own geometry in the manifest (its native
    # voxel spacing in mm along one axis, or the largest: slice thickness, for most stacks)
    source: Literal["table", "spacing_x", "spacing_y", "spacing_z", "spacing_max"] = "table"

    @model_validator(mode="after")
    def _check(self) -> "CovariateColumn":
        if self.kind == "categorical":
            if not self.levels or len(set(self.levels)) != len(self.levels):
                raise ValueError(f"categorical column {self.name!r} needs a list of distinct levels")
            if self.range is not None:
                raise ValueError(f"categorical column {self.name!r} takes levels, not a range")
            if self.missing == "impute" and self.fill not in self.levels:
                raise ValueError(f"column {self.name!r}: missing: impute needs fill set to one of its levels")
        else:
            if self.range is None or not (self.range[0] < self.range[1]):
                raise ValueError(f"continuous column {self.name!r} needs a range [low, high] with low < high")
            if self.levels is not None:
                raise ValueError(f"continuous column {self.name!r} takes a range, not levels")
        if self.source != "table" and self.kind != "continuous":
            raise ValueError(f"column {self.name!r}: {self.source} is a number; declare it kind: continuous")
        return self


class CovariatesConfig(_Strict):
    """Where the table is and what it holds. key: 'participant' (a BIDS participant_id, sub-XX,
    matched through the ingest salt) or 'scan' (a manifest scan_id or source path per row)."""

    table: Path | None = None  # needed unless every column comes from the scans' geometry
    key: Literal["participant", "scan"] = "participant"
    key_column: str = "participant_id"
    columns: list[CovariateColumn] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "CovariatesConfig":
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError("covariates.columns: a column is declared twice")
        if self.key_column in names:
            raise ValueError("covariates.key_column cannot also be a covariate")
        if self.table is None and any(c.source == "table" for c in self.columns):
            raise ValueError("covariates.table is needed: a column is read from the table (source: table)")
        return self


class FeatureEncoderConfig(_Strict):
    """The project's own 3D feature encoder for FID/KID/MMD (contrastive, on the training split)."""

    channels: Channels = (16, 32, 64)
    steps: int = Field(150, ge=1)
    batch_size: int = Field(8, ge=2)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


class GateConfig(_Strict):
    """Thresholds of the export gate. Similarity thresholds are calibrated on held-out real volumes:
    the `memorization_quantile` of their nearest-training similarity, moved `memorization_margin`
    (NCC) or `feature_margin` (feature cosine) of the way towards 1. Intensities are in model units (the training range is about [0, 1])."""

    memorization_quantile: float = Field(0.95, ge=0, le=1)
    memorization_margin: float = Field(0.5, ge=0, lt=1)  # for voxel correlation (NCC)
    # for feature cosine: distinct subjects' cosines have a heavier upper tail than their NCC
    # (benchmarks/metrics_validity.py: held-out max 0.991 against a q95 of 0.972), while copies and
    # lightly noised copies sit above 0.9999, so the cosine threshold sits closer to 1
    feature_margin: float = Field(0.8, ge=0, lt=1)
    intensity_tolerance: float = Field(0.15, ge=0)  # beyond the training volumes' 0.5/99.5 percentile range
    foreground_tolerance: float = Field(0.3, ge=0)  # relative, beyond the training foreground fractions
    histogram_factor: float = Field(3.0, gt=0)  # x the largest held-out per-volume histogram W1
    # x the largest held-out radiomics distance (RMS z-score of the 13 radiomics features against
    # the training set): catches volumes with implausible texture (blur, noise); None turns it off
    radiomics_factor: float | None = Field(2.0, gt=0)
    min_pass_fraction: float = Field(0.5, ge=0, le=1)  # batch verdict
    max_fid: float | None = None  # optional batch thresholds on realism
    max_kid: float | None = None
    max_diversity_ms_ssim: float | None = None  # mean pairwise MS-SSIM above this = mode collapse


class UtilityConfig(_Strict):
    """Train-on-synthetic / test-on-real checks (medgen.quality.utility): the small networks and,
    optionally, gate thresholds on what they measure (None: reported, not gated)."""

    steps: int = Field(150, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(3e-3, gt=0)
    channels: Channels = (8, 16, 32)
    seed: int = 0
    # real + synthetic: the share of real pairs in each batch (None: pooled, each pair equally likely)
    real_fraction: float | None = Field(0.5, gt=0, lt=1)
    min_synthetic_to_real: float | None = Field(None, ge=0)  # Dice(synthetic-trained) / Dice(real-trained)
    min_mask_adherence: float | None = Field(None, ge=0, le=1)  # mean Dice of samples against their asked maps
    min_condition_accuracy: float | None = Field(None, ge=0, le=1)  # on synthetic, for a categorical condition


class QualityConfig(_Strict):
    heldout_splits: list[Split] = ["val", "test"]
    encoder: FeatureEncoderConfig = FeatureEncoderConfig()
    gate: GateConfig = GateConfig()
    utility: UtilityConfig | None = UtilityConfig()  # None: no utility/fidelity checks


class ExportConfig(_Strict):
    formats: list[Literal["nifti", "dicom"]] = ["nifti", "dicom"]


class DenoiseJobConfig(_Strict):
    """Scans to denoise with medgen.denoise (the pipeline's and the denoise flow's job)."""

    sources: list[Path] = Field(min_length=1)  # scan files, DICOM series folders, or manifest.csv files
    out: Path
    model: Path | None = None  # a score-model folder; None = the one shipped with medgen
    sigma: float | None = Field(None, gt=0)
    noise: Literal["gaussian", "rician"] = "gaussian"
    method: Literal["tweedie", "posterior"] = "tweedie"
    n_samples: int = Field(4, ge=1)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # medgen.models.precision
    adapt: int = Field(0, ge=0)  # self-supervised steps on each scan first (medgen.denoise adapt=)


class TorchrunConfig(_Strict):
    """How the train flow launches `torchrun` (one process per GPU; nodes for multi-node runs)."""

    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, ge=1, le=65535)
    device: str | None = None  # cpu | cuda; None: cuda when available


class OrchestrationConfig(_Strict):
    """Where the flows put their outputs and which engines they run on."""

    run_dir: Path = Path("medgen_run")  # training, synthesis, exports and denoised scans go under it
    task_runner: Literal["default", "dask"] = "default"
    dask_address: str | None = None  # an existing scheduler (tcp://host:8786); None with dask = a local cluster
    dask_workers: int = Field(2, ge=1)  # local cluster size
    gpu_slots: int = Field(1, ge=1)  # global concurrency limit 'gpu': cards that trainings share
    torchrun: TorchrunConfig = TorchrunConfig()
    retries: int = Field(2, ge=0)  # I/O tasks
    retry_delay_seconds: list[float] = [2.0, 10.0]


class PipelineConfig(_Strict):
    name: str = "medgen"
    sample_data: Path | None = None  # when set, the demo set is assembled here before ingest
    ingest: IngestConfig | None = None
    data: DataConfig | None = None
    autoencoder: AutoencoderConfig | None = None
    diffusion: DiffusionConfig | None = None
    controlnet: ControlNetConfig | None = None
    generate: GenerateConfig = GenerateConfig()
    denoiser: DenoiserConfig | None = None
    self_supervised: SelfSupervisedConfig | None = None
    covariates: CovariatesConfig | None = None
    quality: QualityConfig = QualityConfig()
    export: ExportConfig = ExportConfig()
    denoise: DenoiseJobConfig | None = None
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        ae = self.autoencoder
        if ae is not None:
            if len(ae.attention_levels) != len(ae.channels):
                raise ValueError("autoencoder.attention_levels needs one entry per channels level")
            if any(c % ae.norm_num_groups for c in ae.channels):
                raise ValueError("autoencoder.channels must be multiples of norm_num_groups")
            if self.data is not None and any(n % ae.downsample for n in self.data.size):
                raise ValueError(
                    f"data.size {self.data.size} must be divisible by the autoencoder's downsampling ({ae.downsample})"
                )
        cn = self.controlnet
        if cn is not None and ae is not None and 2 ** (len(cn.embedding_channels) - 1) != ae.downsample:
            raise ValueError(
                f"controlnet.embedding_channels needs {ae.downsample.bit_length()} levels: one more than the "
                f"autoencoder's downsamplings (x{ae.downsample}), so the label map lands on the latent grid"
            )
        dm = self.diffusion
        if dm is not None:
            if len(dm.attention_levels) != len(dm.channels):
                raise ValueError("diffusion.attention_levels needs one entry per channels level")
            if any(c % dm.norm_num_groups for c in dm.channels):
                raise ValueError("diffusion.channels must be multiples of norm_num_groups")
            if dm.conditioning is not None:
                if not any(dm.attention_levels):
                    raise ValueError(
                        "diffusion.conditioning enters by cross-attention: set at least one diffusion.attention_levels entry true"
                    )
                declared = {c.name for c in self.covariates.columns} if self.covariates else set()
                unknown = [c for c in dm.conditioning.columns if c not in declared]
                if unknown:
                    raise ValueError(
                        f"diffusion.conditioning.columns {unknown} are not declared in the covariates section"
                        + ("" if self.covariates else " (there is none)")
                    )
            if ae is not None and self.data is not None:
                latent = [n // ae.downsample for n in self.data.size]
                down = 2 ** (len(dm.channels) - 1)
                if any(n % down for n in latent):
                    raise ValueError(
                        f"latent size {latent} must be divisible by the diffusion UNet's downsampling ({down})"
                    )
        return self

    def require(self, *sections: str) -> None:
        missing = [s for s in sections if getattr(self, s) is None]
        if missing:
            raise ConfigError(f"config {self.name!r} lacks section(s): {', '.join(missing)}")


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16  # real configs nest 3 deep; a YAML nested 500 deep is an attack, not a config


def _depth(raw: object) -> int:
    """Nesting depth, without recursion (so a hostile file cannot exhaust the stack here)."""
    deepest, stack = 0, [(raw, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_CONFIG_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML config. Every failure is one `ConfigError` naming the file.

    Validation is strict about types: YAML's `true` is not an integer (`steps: true` is refused,
    not taken as 1) and a number is not a string; values go through JSON first so lists still fill
    tuples and strings fill paths.
    """
    import json

    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is not a config (limit {MAX_CONFIG_BYTES})")
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    except RecursionError as e:
        raise ConfigError(f"{path}: nested too deeply to be a config") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections, got {type(raw).__name__}")
    if _depth(raw) > MAX_CONFIG_DEPTH:
        raise ConfigError(f"{path}: nested more than {MAX_CONFIG_DEPTH} levels deep; a config nests 3 or 4")
    try:
        text = json.dumps(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: holds a value that is not plain data ({e}); quote dates and times") from e
    try:
        return PipelineConfig.model_validate_json(text, strict=True)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {problems}") from e
