"""What `precision` means, once, for training and inference alike.

    auto  bf16 on a CUDA card that has it (fp16 on an older card), fp32 on a CPU. A CPU stays in
          fp32 so that CPU runs (the demo, CI, exact resume) give the same numbers everywhere.
    bf16  bf16 on CUDA, and on a CPU with native bf16 (oneDNN: measured 1.8-1.9x faster per
          score-model step and per denoised megavoxel on an AVX512-BF16 EPYC, PSNR within
          0.04 dB); a CPU without it falls back to fp32 (emulated bf16 is slower, not faster).
    fp16  fp16 on CUDA; fp32 elsewhere.
    fp32  full precision (TF32 matmuls on CUDA where torch enables them). 'none' is its old name.

Mixed precision is autocast: weights stay fp32, only the operations that autocast lists run low.
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp16", "fp32", "none"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32", "none")


def cpu_has_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision in ("fp32", "none"):
        return None
    if device.type == "cpu":
        return torch.bfloat16 if precision == "bf16" and cpu_has_bf16() else None
    if device.type != "cuda":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
