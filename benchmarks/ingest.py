"""Ingestion speed: `medgen ingest` (all checks, serial and parallel) vs a plain SimpleITK loop.

    python benchmarks/ingest.py [--repeats 3] [--keep DIR]

Builds a data set of DICOM series from volumes that ship with installed packages (the MNI152 T1
template resliced into axial CT-like and MR series, and CT phantoms), then times, in one run and
on the same files:

  sitk loop   for each series: ImageSeriesReader(GetGDCMSeriesFileNames) + WriteImage(.nii.gz)
  medgen w1   medgen.ingest(workers=1): discovery, hashing, every geometry check, RAS, manifest
  medgen w2   medgen.ingest(workers=2)
  rerun w1    medgen.ingest(workers=1) again on medgen w1's output: nothing changed, nothing read

Each variant runs in its own process (peak RSS is that process tree's largest) on a fresh output
folder; the median of --repeats runs is reported, and the ratio to the sitk loop. Shared machines
are noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_dataset(root: Path) -> list[Path]:
    import nibabel as nib
    from pydicom.uid import RLELossless

    from medgen.demo_data import _package_dir, phantom_ct
    from medgen.io.dicom.write import write_series
    from medgen.volume import Volume, VolumeMeta, centred_affine

    mni = nib.load(_package_dir("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    t1 = np.asarray(mni.get_fdata(dtype=np.float32))
    t1 = (t1 / t1.max() * 1000).round()
    folders = []
    for i in range(4):  # four MR series, each half of the template, shifted and flipped
        half = t1[:, :, i % 2 :: 2] if i < 2 else t1[::-1, :, i % 2 :: 2]
        vol = Volume(half, mni.affine @ np.diag([1, 1, 2, 1]), VolumeMeta(modality="MR"))
        folders.append(root / f"mr_{i}")
        write_series(vol, folders[-1], patient={"PatientID": f"BENCH-MR-{i}"})
    for i in range(2):  # two 256x256x96 CT phantoms, one RLE-compressed
        ct = phantom_ct((256, 256, 96))
        vol = Volume(ct, centred_affine((0.8, 0.8, 1.5), ct.shape), VolumeMeta(modality="CT", units="HU"))
        folders.append(root / f"ct_{i}")
        write_series(
            vol, folders[-1], patient={"PatientID": f"BENCH-CT-{i}"}, transfer_syntax=RLELossless if i else None
        )
    return folders


def run_sitk(src: Path, out: Path) -> int:
    import SimpleITK as sitk

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for folder in sorted(p for p in src.rglob("*") if p.is_dir()) + [src]:
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or []:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            sitk.WriteImage(reader.Execute(), str(out / f"{n:04d}.nii.gz"))
            n += 1
    return n


def run_medgen(src: Path, out: Path, workers: int) -> int:
    from medgen.ingestion.run import ingest

    report = ingest(src, out, workers=workers, salt="bench")
    assert not report.rejected, report.rejected
    return report.converted


def child(variant: str, src: str, out: str) -> None:
    t0 = time.perf_counter()
    if variant == "sitk loop":
        n = run_sitk(Path(src), Path(out))
    else:
        n = run_medgen(Path(src), Path(out), workers=int(variant[-1]))
    seconds = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if variant.endswith("w2") else 0
    print(json.dumps({"scans": n, "seconds": seconds, "peak_mb": max(hwm_kb, workers_kb) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="build the data set here and keep it")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="medgen-bench-"))
    src = work / "src"
    if not src.exists():
        print(f"building the data set in {src} ...", flush=True)
        build_dataset(src)
    files = [p for p in src.rglob("*.dcm")]
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"{len(files)} DICOM files, {mb:.0f} MB, in {len({p.parent for p in files})} series\n")
    variants = ["sitk loop", "medgen w1", "rerun w1", "medgen w2"]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:  # interleaved, so drift in machine load hits every variant alike
            out = work / f"out-{v.replace(' ', '_').replace('rerun', 'medgen')}-{r}"
            if not v.startswith("rerun"):
                shutil.rmtree(out, ignore_errors=True)  # a fresh folder: medgen would otherwise skip unchanged scans
            proc = subprocess.run(
                [sys.executable, __file__, "--child", v, str(src), str(out)], capture_output=True, text=True
            )
            if proc.returncode:
                sys.exit(f"{v} failed:\n{proc.stderr}")
            results[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = statistics.median(x["seconds"] for x in results["sitk loop"])
    print(f"{'variant':<11} {'conv.':>5} {'median s':>9} {'scans/s':>8} {'MB/s':>7} {'peak MB':>8} {'time / sitk':>12}")
    for v in variants:
        s = statistics.median(x["seconds"] for x in results[v])
        n = results[v][0]["scans"]
        peak = max(x["peak_mb"] for x in results[v])
        rate = f"{n / s:>8.2f} {mb / s:>7.1f}" if n else f"{'-':>8} {'-':>7}"
        print(f"{v:<11} {n:>5} {s:>9.2f} {rate} {peak:>8.0f} {s / base:>11.2f}x")
    print(
        "\nmedgen does per series: header parse + SHA-256 of every file, geometry checks, modality LUT,"
        "\nRAS reorientation, NIfTI with qform == sform, atomic writes and a schema-validated manifest."
    )


if __name__ == "__main__":
    main()
