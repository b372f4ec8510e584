"""The demo data set, assembled only from files that ship inside installed packages (no download).

Real scans: pydicom's DICOMDIR test tree (GE/Philips CT and MR series downsized to 16x16, with
real-world faults: a series with missing slices, localizers, tri-planar scouts, 2D radiographs),
pydicom-data's enhanced multi-frame CT and MR, nilearn's MNI152 2009a T1 template and nibabel's
test T1 and 4D EPI. Generated: 3D Shepp-Logan phantoms (phantominator) written by medgen as
compressed CT and MR DICOM series, one of them oblique. These are few and small: good for tests and
the demo, not for claims that a model generalises. Real use needs your own data (IXI, BraTS,
TCIA...), read through the same `medgen ingest`.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgen.io.atomic import write_text_atomic
from medgen.io.nifti import load_image, write_nifti
from medgen.volume import Volume, VolumeMeta, centred_affine

MARKER = ".medgen-sample-data"


@dataclass(frozen=True)
class SampleItem:
    path: str  # relative to the sample folder
    origin: str  # package and file it came from, or how it was generated
    licence: str
    expect: str  # what ingestion should do with it, and why


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name} is needed for the sample data; install medgen's dependencies")
    return Path(next(iter(spec.submodule_search_locations)))


def rotation(degrees_xyz: tuple[float, float, float]) -> np.ndarray:
    """A rotation matrix from Euler angles (x, then y, then z), for oblique test geometry."""
    ax, ay, az = np.radians(degrees_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


NOISY_PHANTOM_SIGMA = 0.05  # of the 99.5th percentile: the demo's noisy scan


def phantom_ct(shape: tuple[int, int, int] = (64, 64, 48)) -> np.ndarray:
    """A 3D Shepp-Logan head phantom in plausible Hounsfield units (air -1000, brain ~40, bone ~840)."""
    import phantominator

    c = phantominator.ct_shepp_logan(shape)
    return np.round(np.where(c <= 1e-6, -1000.0, (c - 0.2) * 1000.0 + 40.0)).astype(np.float32)


def phantom_mr(shape: tuple[int, int, int] = (64, 64, 40)) -> np.ndarray:
    """Proton density (M0) of the 3D MR Shepp-Logan phantom, scaled to a 0-1000 signal."""
    import phantominator

    m0, _t1, _t2 = phantominator.mr_shepp_logan(shape, zlims=(-0.8, 0.8))
    return (np.asarray(m0, dtype=np.float64) * 1000.0).astype(np.float32)


POPULATION_SIZE = 16


def mni_template() -> tuple[np.ndarray, np.ndarray]:
    """nilearn's MNI152 2009a T1 template (data scaled to its 99.5th percentile = 1, affine)."""

    img = load_image(_package_dir("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return data / np.percentile(data, 99.5), img.affine


def _unit_grid(shape: tuple[int, int, int]) -> np.ndarray:
    """(3, *shape) voxel-centre coordinates spanning [-1, 1] along each axis."""
    return np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij"))


def _ellipsoid(g: np.ndarray, c: np.ndarray, r: np.ndarray, angles: tuple[float, float, float]) -> np.ndarray:
    """Mask of the ellipsoid with centre c, semi-axes r, rotated by `angles` (degrees), on grid g."""
    q = np.einsum("ij,j...->i...", rotation(angles).astype(np.float32), g - c.astype(np.float32)[:, None, None, None])
    return ((q / r.astype(np.float32)[:, None, None, None]) ** 2).sum(0) < 1


def random_phantom(shape: tuple[int, int, int], rng: np.random.Generator, sharp: bool = False) -> np.ndarray:
    """Random overlapping ellipsoids, with smooth textures or (`sharp`) piecewise constant: training
    objects for the denoiser (the Shepp-Logan phantom itself stays a held-out test object)."""
    from scipy.ndimage import gaussian_filter

    g = _unit_grid(shape)
    vol = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(6, 16))):
        inside = _ellipsoid(g, rng.uniform(-0.5, 0.5, 3), rng.uniform(0.08, 0.6, 3), tuple(rng.uniform(-90, 90, 3)))
        vol[inside] = rng.uniform(
            0.1, 1.0
        )  # drawn after the ellipsoid: the recorded training arrays depend on the order
    if sharp:
        return vol / max(float(np.percentile(vol, 99.5)), 1e-6)
    texture = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3) * 4
    vol = gaussian_filter(vol, 0.7) * (1 + 0.15 * texture)
    return np.clip(vol, 0, None) / max(float(np.percentile(vol, 99.5)), 1e-6)


def nested_phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A piecewise-constant head-like object: an outer shell around a body holding smaller
    ellipsoids whose levels step away from the body's by log-uniform contrasts (1-50 %), so the
    denoiser sees faint edges and thin shells as well as strong ones. A generic family; the
    Shepp-Logan phantom itself stays a held-out test object."""
    g = _unit_grid(shape)
    c0, r0 = rng.uniform(-0.1, 0.1, 3), rng.uniform(0.6, 0.95, 3)
    angles0 = tuple(rng.uniform(-30, 30, 3))
    outer = _ellipsoid(g, c0, r0, angles0)
    body = _ellipsoid(g, c0, r0 * (1 - rng.uniform(0.03, 0.12)), angles0)
    vol = np.zeros(shape, np.float32)
    vol[outer] = rng.uniform(0.5, 1.0)
    level = rng.uniform(0.1, 0.9)
    vol[body] = level
    for _ in range(int(rng.integers(5, 16))):
        inner = (
            _ellipsoid(
                g, c0 + rng.uniform(-0.5, 0.5, 3) * r0, r0 * rng.uniform(0.03, 0.4, 3), tuple(rng.uniform(-90, 90, 3))
            )
            & body
        )
        step = float(np.exp(rng.uniform(np.log(0.01), np.log(0.5)))) * rng.choice([-1.0, 1.0])
        vol[inner] = np.clip(level + step, 0.02, 1.0)
    return vol / max(float(np.percentile(vol, 99.5)), 1e-6)


def template_population(
    n: int = POPULATION_SIZE, seed: int = 0, spacing: float = 2.0, template: tuple[np.ndarray, np.ndarray] | None = None
) -> list[Volume]:
    """`n` pseudo-subjects from the MNI152 T1 template (see `_population`)."""
    return _population(n, seed, spacing, template)[0]


def _population(
    n: int,
    seed: int,
    spacing: float,
    template: tuple[np.ndarray, np.ndarray] | None = None,
    also: tuple[np.ndarray, ...] = (),
) -> tuple[list[Volume], list[list[np.ndarray]]]:
    """`n` pseudo-subjects from the MNI152 T1 template: random affine (+-6 deg, +-6 % scale,
    +-3 mm shift), a smooth multiplicative bias field and a gamma change, resampled to `spacing` mm.

    They are variants of ONE brain, not independent subjects: enough for a CPU demo and tests of
    the training machinery, never for claims that a model generalises.
    """
    from scipy.ndimage import affine_transform

    src, src_affine = template if template is not None else mni_template()
    extent = np.array(src.shape) * np.abs(np.diag(src_affine)[:3])
    shape = tuple(int(e // spacing) for e in extent)
    out_affine = centred_affine((spacing,) * 3, shape)  # RAS, centred on the world origin (the template's AC)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    volumes: list[Volume] = []
    warped: list[list[np.ndarray]] = []  # `also` (maps on the template's grid) through each warp
    for _ in range(n):
        warp = np.eye(4)
        warp[:3, :3] = rotation(tuple(rng.uniform(-6, 6, 3))) @ np.diag(rng.uniform(0.94, 1.06, 3))
        warp[:3, 3] = rng.uniform(-3, 3, 3)
        # output voxel -> world -> (inverse warp) -> template voxel
        m = np.linalg.inv(src_affine) @ np.linalg.inv(warp) @ out_affine
        vol = affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=1, cval=0.0)
        warped.append(
            [affine_transform(a, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=1, cval=0.0) for a in also]
        )
        coeffs = rng.normal(0, 0.12, (3, 3))
        bias = np.exp(
            sum(
                coeffs[a, 0] * grid[a] + coeffs[a, 1] * grid[a] ** 2 + coeffs[a, 2] * grid[a] * grid[(a + 1) % 3]
                for a in range(3)
            )
        )
        vol = np.clip(vol, 0, None) ** rng.uniform(0.8, 1.25) * bias
        volumes.append(Volume((vol * 1000.0).astype(np.float32), out_affine, VolumeMeta(modality="MR")))
    return volumes, warped


TISSUE_LABELS = {1: "grey matter", 2: "white matter", 3: "lesion (simulated)"}


def lesion_population(
    n: int = POPULATION_SIZE, seed: int = 0, spacing: float = 2.0
) -> tuple[list[Volume], list[np.ndarray], list[bool]]:
    """The template population with what conditioned generation and ControlNet need: tissue
    labels (grey / white matter from nilearn's MNI152 probability maps, warped with each subject)
    and, in every other subject, a SIMULATED lesion: a dark ellipsoid (a quarter of the white
    matter signal, 24-32 mm radii) centred in white matter, labelled 3. The images and maps are the template population's
    exactly, plus the lesion: the lesion flag really changes the image, the maps really match it.
    Nothing here is a patient's lesion; it is disclosed as simulated wherever it is written."""

    data = _package_dir("nilearn") / "datasets" / "data"
    gm = np.asarray(load_image(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").get_fdata(dtype=np.float32))
    wm = np.asarray(load_image(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").get_fdata(dtype=np.float32))
    volumes, warped = _population(n, seed, spacing, also=(gm, wm))
    rng = np.random.default_rng([seed, 1])  # its own stream: the population itself is unchanged
    out_v, out_l, flags = [], [], []
    for i, (vol, (g, w)) in enumerate(zip(volumes, warped)):
        labels = np.zeros(vol.shape, np.uint8)
        labels[(g > 0.5) & (g >= w)] = 1
        labels[(w > 0.5) & (w > g)] = 2
        data_i = vol.data.copy()
        has = i % 2 == 0
        if has:
            white = np.argwhere(labels == 2)
            centre = white[rng.integers(len(white))]
            radii = rng.uniform(24, 32, 3) / spacing
            grid = np.stack(np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij")).astype(np.float32)
            inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
            inside &= labels > 0  # inside the brain
            # dark (a T1 "black hole"): a bright one saturates at the percentile scaling's top, a
            # shade above white matter, and no 6 mm model could tell it apart
            data_i[inside] = np.percentile(data_i[labels == 2], 50) * 0.25
            labels[inside] = 3
        out_v.append(vol.replace(data=data_i.astype(np.float32)))
        out_l.append(labels)
        flags.append(has)
    return out_v, out_l, flags


def build_sample_data(out: str | Path, *, force: bool = False) -> list[SampleItem]:
    """Assemble the demo set into `out` (idempotent: a complete set is left as it is)."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from medgen.io.dicom.write import write_series

    out = Path(out)
    if (out / MARKER).exists() and not force:
        return _read_items(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    items: list[SampleItem] = []

    pyd = _package_dir("pydicom") / "data" / "test_files" / "dicomdirtests"
    shutil.copytree(pyd, out / "dicom" / "pydicom_dicomdirtests")
    items.append(
        SampleItem(
            "dicom/pydicom_dicomdirtests",
            "pydicom data/test_files/dicomdirtests (real GE/Philips/Agfa studies, pixels downsized to 16x16)",
            "MIT (pydicom)",
            "CT5N accepted (5 axial slices); CT2 rejected (missing slices); CT2N, MR1, CR rejected (localizers, single 2D images); "
            "MR2, MR700 rejected (mixed orientations); TINY_ALPHA rejected (no pixel data)",
        )
    )
    for name, dest, expect in [
        (
            "eCT_Supplemental.dcm",
            "dicom/enhanced_ct/eCT_Supplemental.dcm",
            "accepted: enhanced multi-frame CT, 2 frames of 512x512, HU",
        ),
        (
            "emri_small_jpeg_2k_lossless.dcm",
            "dicom/enhanced_mr/emri_small_jpeg_2k_lossless.dcm",
            "rejected: enhanced MR without per-frame plane position",
        ),
    ]:
        src = get_testdata_file(name, download=False)
        if src is None:
            raise FileNotFoundError(f"pydicom test file {name} not found; is pydicom-data installed?")
        (out / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / dest)
        items.append(SampleItem(dest, f"pydicom / pydicom-data {name}", "MIT (pydicom, pydicom-data)", expect))

    ct = phantom_ct()
    ct_vol = Volume(ct, centred_affine((0.9, 0.9, 2.0), ct.shape), VolumeMeta(modality="CT", units="HU"))
    write_series(
        ct_vol,
        out / "dicom" / "phantom_ct_rle",
        patient={"PatientName": "PHANTOM^CT", "PatientID": "PHANTOM-CT-001", "PatientBirthDate": "19700101"},
        series_description="Shepp-Logan CT phantom",
        transfer_syntax=RLELossless,
        uid_seed="medgen-sample-ct",
    )
    items.append(
        SampleItem(
            "dicom/phantom_ct_rle",
            "generated: phantominator.ct_shepp_logan 64x64x48, HU",
            "MIT (phantominator)",
            "accepted: CT series, RLE Lossless",
        )
    )
    mr = phantom_mr()
    mr_vol = Volume(
        mr, centred_affine((1.0, 1.0, 1.5), mr.shape, rotation((12.0, -8.0, 20.0))), VolumeMeta(modality="MR")
    )
    write_series(
        mr_vol,
        out / "dicom" / "phantom_mr_oblique_j2k",
        patient={"PatientName": "PHANTOM^MR", "PatientID": "PHANTOM-MR-001", "PatientBirthDate": "19700101"},
        series_description="Shepp-Logan MR phantom, oblique",
        transfer_syntax=JPEG2000Lossless,
        uid_seed="medgen-sample-mr",
    )
    items.append(
        SampleItem(
            "dicom/phantom_mr_oblique_j2k",
            "generated: phantominator.mr_shepp_logan M0, 64x64x40, oblique",
            "MIT (phantominator)",
            "accepted: oblique MR series, JPEG 2000 Lossless",
        )
    )
    # A scan that really is noisy, for the demo's denoising step (the phantoms above are noise-free:
    # denoising them shows nothing). Simulated, and said so in its SeriesDescription.
    sigma = NOISY_PHANTOM_SIGMA * float(np.percentile(mr, 99.5))
    noisy = mr + sigma * np.random.default_rng(20261202).standard_normal(mr.shape).astype(np.float32)
    write_series(
        Volume(noisy.astype(np.float32), centred_affine((1.0, 1.0, 1.5), mr.shape), VolumeMeta(modality="MR")),
        out / "dicom" / "phantom_mr_noisy",
        patient={"PatientName": "PHANTOM^MR", "PatientID": "PHANTOM-MR-002", "PatientBirthDate": "19700101"},
        series_description=f"Shepp-Logan MR phantom + simulated Gaussian noise (sigma {NOISY_PHANTOM_SIGMA:g} of p99.5)",
        uid_seed="medgen-sample-mr-noisy",
    )
    items.append(
        SampleItem(
            "dicom/phantom_mr_noisy",
            f"generated: phantominator.mr_shepp_logan M0 64x64x40 + Gaussian noise sigma {NOISY_PHANTOM_SIGMA:g} x p99.5 (seed 20261202)",
            "MIT (phantominator)",
            "accepted: MR series; the demo denoises it (DICOM in, DERIVED DICOM out)",
        )
    )

    nifti = out / "nifti"
    nifti.mkdir()
    mni = _package_dir("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    shutil.copy2(mni, nifti / "mni152_2009a_T1w.nii.gz")
    items.append(
        SampleItem(
            "nifti/mni152_2009a_T1w.nii.gz",
            "nilearn datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
            "BSD-3 (nilearn); MNI ICBM152 template terms",
            "accepted: 197x233x189 T1 at 1 mm",
        )
    )
    nib_data = _package_dir("nibabel") / "tests" / "data"
    shutil.copy2(nib_data / "anatomical.nii", nifti / "nibabel_anatomical_T1w.nii")
    items.append(
        SampleItem(
            "nifti/nibabel_anatomical_T1w.nii",
            "nibabel tests/data/anatomical.nii",
            "MIT (nibabel)",
            "accepted: small real T1, 33x41x25",
        )
    )
    shutil.copy2(nib_data / "example4d.nii.gz", nifti / "nibabel_example4d_bold.nii.gz")
    items.append(
        SampleItem(
            "nifti/nibabel_example4d_bold.nii.gz",
            "nibabel tests/data/example4d.nii.gz",
            "MIT (nibabel)",
            "rejected by default (4D EPI, 2 frames); accepted as 2 volumes with --frames split",
        )
    )
    import nibabel as nib

    pop = nifti / "population"
    der = pop / "derivatives" / "tissue"
    der.mkdir(parents=True)
    write_text_atomic(
        der / "dataset_description.json",
        '{"Name": "medgen demo tissue labels (lesions SIMULATED)", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}\n',
    )
    write_text_atomic(der / "dseg.tsv", "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in TISSUE_LABELS.items()))
    rows = ["participant_id\tlesion"]
    for i, (vol, labels, has) in enumerate(zip(*lesion_population())):
        sub = f"sub-pop{i:02d}"
        write_nifti(vol, pop / sub / "anat" / f"{sub}_T1w.nii.gz")
        (der / sub / "anat").mkdir(parents=True)
        nib.save(nib.Nifti1Image(labels, vol.affine), der / sub / "anat" / f"{sub}_dseg.nii.gz")
        rows.append(f"{sub}\t{'yes' if has else 'no'}")
    write_text_atomic(pop / "participants.tsv", "\n".join(rows) + "\n")
    write_text_atomic(
        pop / "participants.json",
        '{"lesion": {"Description": "SIMULATED lesion present (medgen.demo_data.lesion_population): not a diagnosis", '
        '"Levels": {"yes": "a simulated dark white-matter lesion was added", "no": "none added"}}}\n',
    )
    items.append(
        SampleItem(
            "nifti/population",
            f"generated: {POPULATION_SIZE} random affine + bias field + gamma variants of the MNI152 T1 template at 2 mm (seed 0); "
            "every other one with a SIMULATED dark white-matter lesion; tissue labels (grey/white matter from the MNI152 "
            "probability maps, lesion) in derivatives/tissue/*_dseg.nii.gz; participants.tsv says which have the lesion",
            "BSD-3 (nilearn); MNI ICBM152 template terms",
            "accepted: one BIDS-style subject each with its dseg paired (labels.csv) (the training population of the demo; "
            "variants of one brain with simulated lesions, not independent subjects or real pathology)",
        )
    )
    _write_items(out, items)
    return items


def _write_items(out: Path, items: list[SampleItem]) -> None:
    import json
    from dataclasses import asdict

    lines = [
        "# medgen sample data",
        "",
        "Built by `medgen sample-data` from files inside installed packages; nothing downloaded.",
        "",
    ]
    lines += [f"- `{i.path}` — {i.origin}. Licence: {i.licence}. Expect: {i.expect}." for i in items]
    write_text_atomic(out / "README.md", "\n".join(lines) + "\n")
    write_text_atomic(out / MARKER, json.dumps([asdict(i) for i in items], indent=1))


def _read_items(out: Path) -> list[SampleItem]:
    import json

    return [SampleItem(**d) for d in json.loads((out / MARKER).read_text())]
