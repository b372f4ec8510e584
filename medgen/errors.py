"""Typed errors for bad input.

Every error about an input names the file (or series) and the reason, so a batch can report it in
one manifest row and move on. Callers catch `InputError` to skip a scan; anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class MedgenError(Exception):
    """Base of every error medgen raises on purpose."""

    hint = ""  # what the user can do about it: shown by the CLI and the flows' entry points


def user_message(err: MedgenError) -> str:
    """One clear message for a person: code, file and reason, and what to do. Control characters
    from file names are escaped (a name can hold terminal escape sequences)."""
    from medgen.text import printable

    code = getattr(err, "code", None) or type(err).__name__
    text = f"medgen: error [{code}] {printable(str(err))}"
    return text + (f"\n  what to do: {err.hint}" if err.hint else "")


class InputError(MedgenError):
    """A scan that cannot become a trustworthy volume. `path` names it, `reason` says why."""

    hint = "fix or replace this file (`medgen ingest` records it as a rejected row and goes on)"

    code = "invalid_input"

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes despite the two-argument __init__
        return (type(self), (self.path, self.reason))


def error_class(code: str) -> type[InputError]:
    """The InputError subclass with this `code` (to rebuild a cached error without re-reading)."""
    stack: list[type[InputError]] = [InputError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return InputError


class UnreadableFileError(InputError):
    code = "unreadable"


class EmptyFileError(InputError):
    code = "empty_file"


class NotDicomError(InputError):
    code = "not_dicom"


class TruncatedFileError(InputError):
    code = "truncated"


class MissingPixelDataError(InputError):
    code = "missing_pixel_data"


class UnsupportedImageError(InputError):
    """Valid DICOM/NIfTI that medgen does not turn into volumes (colour, non-image SOP classes...)."""

    code = "unsupported"


class UnsupportedObjectError(InputError):
    """A DICOM object that is not an image volume (RT dose/structure/plan, SEG, SR, presentation
    state, key object...): recorded as its own row so the user sees what was set aside."""

    code = "unsupported_object"


class InvalidHeaderError(InputError):
    """A header value that cannot be what it claims (a RescaleSlope that is not a number...)."""

    code = "invalid_header"


class TooLargeError(InputError):
    """More voxels than the configured ceiling, or than the bytes present can hold."""

    code = "too_large"


class InternalError(InputError):
    """An unexpected failure while handling one scan: recorded (type and message) so the batch goes on."""

    code = "internal_error"


class NotAVolumeError(InputError):
    """A single 2D image (one slice, or a projection radiograph)."""

    code = "not_3d"


class FourDimensionalError(InputError):
    code = "four_d"


class InvalidValuesError(InputError):
    """NaN or inf voxels."""

    code = "invalid_values"


class EmptyVolumeError(InputError):
    """No information: zero-sized, or every voxel the same value."""

    code = "empty_volume"


class GeometryError(InputError):
    """The slices do not form one regular grid; returning a volume would misplace voxels."""

    code = "geometry"


class MissingGeometryError(GeometryError):
    code = "missing_geometry"


class DuplicateSliceError(GeometryError):
    code = "duplicate_slice"


class MissingSliceError(GeometryError):
    code = "missing_slice"


class NonUniformSpacingError(GeometryError):
    code = "non_uniform_spacing"


class MixedOrientationError(GeometryError):
    code = "mixed_orientation"


class MixedImageSizeError(GeometryError):
    code = "mixed_size"


class GantryTiltError(GeometryError):
    code = "gantry_tilt"


class ShearedAffineError(GeometryError):
    code = "sheared_affine"


class AmbiguousSourceError(InputError):
    """`load_volume` was asked for one volume but the source holds several series."""

    code = "ambiguous"


class ManifestError(MedgenError):
    """A manifest that does not match data_schemas/manifest.schema.json."""


# Errors of the stages: each says which file or folder and why.


class DenoiseError(MedgenError, ValueError):
    """A denoising request that cannot be honoured (bad sigma, method, n_samples...)."""

    hint = "correct the argument named above (`medgen denoise --help` lists them)"


class SamplingError(MedgenError, ValueError):
    """A sampling request the model cannot honour (a sampler it was not trained for, too few DDPM steps)."""

    hint = "use --sampler ddim for few steps (or rflow for a rectified-flow model)"


class ConditionError(SamplingError):
    """A condition the generator cannot be given: a column it was not trained on, a level it never
    saw, a value outside the range it was trained over, or a condition for an unconditioned model."""

    code = "condition"
    hint = "ask only for the columns, levels and ranges the message lists (the generator's configs/metadata.json, conditioning)"


class RunError(MedgenError):
    """A folder that is not a usable synthesis run (missing or altered files)."""


class BundleError(MedgenError):
    """A model folder that is incomplete, altered, or of an unknown format."""

    hint = "point at a folder written by `medgen train` (or the shipped default), unaltered"


class ValidationError(MedgenError):
    """A run that cannot be validated (no training manifest, too few real volumes, ...)."""


class ExportError(MedgenError):
    """An export refused: the run is not validated, its batch failed, or the target is unusable."""

    hint = (
        "only a run whose batch passed `medgen validate` is exported: generate again or adjust the gate in the config"
    )


class TrainingDivergedError(MedgenError):
    """Too many steps with non-finite loss or gradients: training stopped rather than go on."""


class NoTrainingDataError(MedgenError):
    """The manifest has no accepted row matching the data config."""


class IngestError(MedgenError):
    """An ingest that cannot start: a source that does not exist, or lies inside the output folder."""

    hint = "check the source paths and choose an --out outside them"


class OutputExistsError(MedgenError):
    """An output folder or file that holds something medgen did not write (or is the input itself)."""

    hint = "choose a new or empty --out, or pass --overwrite (medgen then replaces only its own earlier output)"


class ConfigError(MedgenError):
    """A config file that cannot be used; the message names the file and every bad field."""

    hint = "correct the named field(s); configs/demo.yaml is a complete example"
