"""The gate: per-volume checks (plausibility, memorization) and batch metrics (realism,
diversity) turned into verdicts. Pure arrays in, dataclasses out; reading runs and writing reports
is medgen.quality.validate's job.

Every threshold that depends on the data is calibrated on real volumes: intensity range and
foreground fraction on the training set, histogram distance and similarity-to-training on held-out
real volumes (the model never saw them, so they show how close an honest new scan gets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from medgen.config import GateConfig
from medgen.quality.metrics import fidelity
from medgen.quality.metrics.diversity import mean_pairwise_ms_ssim
from medgen.quality.metrics.features import Encoder
from medgen.quality.metrics.privacy import calibrate, nearest_feature_cosine, nearest_ncc


@dataclass
class Thresholds:
    intensity_low: float
    intensity_high: float
    foreground_low: float
    foreground_high: float
    histogram_w1: float
    radiomics_z: float | None
    ncc: float
    feature_cosine: float


@dataclass
class Reference:
    """Real volumes in model space and everything calibrated from them."""

    train: np.ndarray  # (N, X, Y, Z)
    heldout: np.ndarray
    train_ids: list[str]
    encoder: Encoder
    train_features: np.ndarray
    heldout_features: np.ndarray
    train_radiomics: np.ndarray
    train_values: np.ndarray  # pooled intensity sample
    thresholds: Thresholds
    calibration: dict[str, list[float]]  # held-out similarities and W1 (reported)
    heldout_realism: dict[str, float | None]  # the realism metrics of held-out reals: the baseline
    real_diversity: float | None  # mean pairwise MS-SSIM of the training set


def radiomics_z(rad: np.ndarray, train_rad: np.ndarray) -> np.ndarray:
    """RMS z-score of each row's radiomics features against the training set's."""
    mu, sd = train_rad.mean(0), train_rad.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return np.sqrt((((rad - mu) / sd) ** 2).mean(1))


def _robust_range(v: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(v, [0.5, 99.5])
    return float(lo), float(hi)


def build_reference(
    train: np.ndarray, heldout: np.ndarray, train_ids: list[str], encoder: Encoder, gate: GateConfig
) -> Reference:
    if len(train) < 2 or len(heldout) < 1:
        raise ValueError(
            f"the gate needs >= 2 training and >= 1 held-out real volumes (got {len(train)} and {len(heldout)})"
        )
    tf, hf = encoder(train), encoder(heldout)
    values = fidelity.pooled_values(train)
    ranges = np.array([_robust_range(v) for v in train])
    fg = np.array([fidelity.foreground(v).mean() for v in train])
    ho_ncc = nearest_ncc(heldout, train).similarity
    ho_cos = nearest_feature_cosine(hf, tf).similarity
    ho_w1 = np.array([fidelity.volume_w1(v, values) for v in heldout])
    train_rad = np.stack([fidelity.radiomics(v) for v in train])
    ho_rad = np.stack([fidelity.radiomics(v) for v in heldout])
    ho_rz = radiomics_z(ho_rad, train_rad)
    tol, ftol = gate.intensity_tolerance, gate.foreground_tolerance
    thresholds = Thresholds(
        intensity_low=float(ranges[:, 0].min() - tol),
        intensity_high=float(ranges[:, 1].max() + tol),
        foreground_low=float(fg.min() * (1 - ftol)),
        foreground_high=float(min(1.0, fg.max() * (1 + ftol))),
        histogram_w1=float(max(ho_w1.max(), 1e-3) * gate.histogram_factor),
        radiomics_z=float(ho_rz.max() * gate.radiomics_factor) if gate.radiomics_factor is not None else None,
        ncc=calibrate(ho_ncc, gate.memorization_quantile, gate.memorization_margin),
        feature_cosine=calibrate(ho_cos, gate.memorization_quantile, gate.feature_margin),
    )
    ref = Reference(
        train=train,
        heldout=heldout,
        train_ids=list(train_ids),
        encoder=encoder,
        train_features=tf,
        heldout_features=hf,
        train_radiomics=train_rad,
        train_values=values,
        thresholds=thresholds,
        calibration={
            "heldout_ncc": ho_ncc.tolist(),
            "heldout_feature_cosine": ho_cos.tolist(),
            "heldout_histogram_w1": ho_w1.tolist(),
            "heldout_radiomics_z": ho_rz.tolist(),
        },
        heldout_realism={},
        real_diversity=mean_pairwise_ms_ssim(train),
    )
    ref.heldout_realism = realism(heldout, ref, hf, ho_rad)
    return ref


@dataclass
class VolumeVerdict:
    name: str
    passed: bool
    reasons: list[str]
    checks: dict[str, float | bool | None]
    nearest_train: str | None = None


@dataclass
class BatchResult:
    volumes: list[VolumeVerdict]
    realism: dict[str, float | None]
    heldout_realism: dict[str, float | None]
    diversity: dict[str, float | None]
    passed: bool
    reasons: list[str]
    thresholds: dict[str, float]
    calibration: dict[str, list[float]]
    encoder_id: str
    n_train: int
    n_heldout: int
    extra: dict = field(default_factory=dict)

    @property
    def passing(self) -> list[str]:
        return [v.name for v in self.volumes if v.passed]

    def to_json(self) -> dict:
        return asdict(self)


def realism(
    volumes: np.ndarray, ref: Reference, features: np.ndarray | None = None, radiomics: np.ndarray | None = None
) -> dict[str, float | None]:
    """Set-level distances to the training set (None where a set is too small). `features` and
    `radiomics`, when the caller has them already, save computing them again."""
    if len(volumes) == 0:
        return {k: None for k in ("fid", "kid", "mmd", "frd", "histogram_w1")}
    f = ref.encoder(volumes) if features is None else features
    rad = np.stack([fidelity.radiomics(v) for v in volumes]) if radiomics is None else radiomics
    return {
        "fid": fidelity.fid(f, ref.train_features),
        "kid": fidelity.kid(f, ref.train_features) if len(f) > 1 else None,
        "mmd": fidelity.mmd(f, ref.train_features) if len(f) > 1 else None,
        "frd": fidelity.frd(rad, ref.train_radiomics),
        "histogram_w1": fidelity.histogram_w1(volumes, ref.train_values),
    }


def assess(
    volumes: np.ndarray, names: list[str], ref: Reference, gate: GateConfig, geometry_ok: list[bool] | None = None
) -> BatchResult:
    """Verdicts for model-space synthetic volumes (N, X, Y, Z) against the reference."""
    th = ref.thresholds
    geometry_ok = geometry_ok or [True] * len(volumes)
    verdicts: list[VolumeVerdict] = []
    finite = [bool(np.all(np.isfinite(v))) for v in volumes]
    good = np.array([v for v, ok, g in zip(volumes, finite, geometry_ok) if ok and g])
    good_names = [n for n, ok, g in zip(names, finite, geometry_ok) if ok and g]
    feats = ref.encoder(good) if len(good) else np.zeros((0, ref.train_features.shape[1]))
    ncc = nearest_ncc(good, ref.train) if len(good) else None
    cos = nearest_feature_cosine(feats, ref.train_features) if len(good) else None
    rad = np.stack([fidelity.radiomics(v) for v in good]) if len(good) else None
    rz_all = radiomics_z(rad, ref.train_radiomics) if rad is not None else None
    row = {n: i for i, n in enumerate(good_names)}
    for v, name, ok, geo in zip(volumes, names, finite, geometry_ok):
        reasons: list[str] = []
        checks: dict[str, float | bool | None] = {"finite": ok, "geometry": geo}
        nearest = None
        if not geo:
            reasons.append("geometry differs from the model's (shape or affine)")
        if not ok:
            reasons.append("contains NaN or infinite values")
        if ok and geo:
            i = row[name]
            lo, hi = _robust_range(v)
            fg = float(fidelity.foreground(v).mean())
            w1 = fidelity.volume_w1(v, ref.train_values)
            assert rz_all is not None and ncc is not None and cos is not None  # it is among the good ones
            rz = float(rz_all[i])
            checks.update(
                intensity_p0_5=lo,
                intensity_p99_5=hi,
                foreground_fraction=fg,
                histogram_w1=w1,
                radiomics_z=rz,
                nearest_ncc=float(ncc.similarity[i]),
                nearest_feature_cosine=float(cos.similarity[i]),
            )
            nearest = ref.train_ids[int(ncc.index[i])]
            if lo < th.intensity_low or hi > th.intensity_high:
                reasons.append(
                    f"intensity range [{lo:.3g}, {hi:.3g}] outside the training range [{th.intensity_low:.3g}, {th.intensity_high:.3g}]"
                )
            if not th.foreground_low <= fg <= th.foreground_high:
                reasons.append(
                    f"foreground fraction {fg:.3f} outside [{th.foreground_low:.3f}, {th.foreground_high:.3f}]"
                )
            if w1 > th.histogram_w1:
                reasons.append(f"intensity histogram W1 {w1:.4f} to training > {th.histogram_w1:.4f}")
            if th.radiomics_z is not None and rz > th.radiomics_z:
                reasons.append(
                    f"texture/intensity statistics {rz:.2f} SD from training (radiomics) > {th.radiomics_z:.2f}"
                )
            if ncc.similarity[i] > th.ncc:
                reasons.append(
                    f"memorized: correlation {ncc.similarity[i]:.4f} with training scan {nearest} > {th.ncc:.4f}"
                )
            if cos.similarity[i] > th.feature_cosine:
                nearest_f = ref.train_ids[int(cos.index[i])]
                reasons.append(
                    f"memorized: feature cosine {cos.similarity[i]:.4f} with training scan {nearest_f} > {th.feature_cosine:.4f}"
                )
        verdicts.append(
            VolumeVerdict(name=name, passed=not reasons, reasons=reasons, checks=checks, nearest_train=nearest)
        )
    real = realism(good, ref, feats, rad)
    div = {
        "synthetic_mean_pairwise_ms_ssim": mean_pairwise_ms_ssim(good),
        "real_mean_pairwise_ms_ssim": ref.real_diversity,
    }
    reasons = []
    n_pass = sum(v.passed for v in verdicts)
    if len(verdicts) == 0 or n_pass / len(verdicts) < gate.min_pass_fraction:
        reasons.append(f"{n_pass} of {len(verdicts)} volumes pass (< {gate.min_pass_fraction:.0%})")
    for key, limit in (("fid", gate.max_fid), ("kid", gate.max_kid)):
        value = real[key]
        if limit is not None and value is not None and value > limit:
            reasons.append(f"{key.upper()} {value:.4g} > {limit:.4g}")
    d = div["synthetic_mean_pairwise_ms_ssim"]
    if gate.max_diversity_ms_ssim is not None and d is not None and d > gate.max_diversity_ms_ssim:
        reasons.append(f"mean pairwise MS-SSIM {d:.4f} > {gate.max_diversity_ms_ssim:.4f} (too little diversity)")
    return BatchResult(
        volumes=verdicts,
        realism=real,
        heldout_realism=ref.heldout_realism,
        diversity=div,
        passed=not reasons,
        reasons=reasons,
        thresholds=asdict(th),
        calibration=ref.calibration,
        encoder_id=ref.encoder.encoder_id,
        n_train=len(ref.train),
        n_heldout=len(ref.heldout),
    )
