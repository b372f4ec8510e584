"""The shared training loop: AMP, EMA, accumulation, clipping, NaN guard, DDP, exact resume.

What makes resume exact without trusting global RNG state: the batch of step s comes from
`StepSampler` (a pure function of seed and step) and every random draw of a step (noise,
timesteps, KL samples) comes from a `torch.Generator` seeded by (seed, step, micro-batch, rank)
and handed to the step function. Model, optimizer, scaler, EMA and LR-schedule states are in the
checkpoint, written atomically every `checkpoint_every` steps; the global RNG states are saved too,
for code outside our control.

The same command scales: under `torchrun` (WORLD_SIZE > 1) each process takes its shard of every
step's batch, modules are wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPU), and rank 0
alone writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medgen.config import StageTrainConfig
from medgen.datasets.prepared import StepSampler
from medgen.errors import MedgenError, TrainingDivergedError
from medgen.io.atomic import atomic_path
from medgen.models.precision import autocast_dtype
from medgen.seeding import keyed_generator

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Dist:
    """Process group from torchrun's environment (or a single process), and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise MedgenError(f"device {device!r} requested but CUDA is not available")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def wrap(module: nn.Module, d: Dist) -> nn.Module:
    module = module.to(d.device)
    if d.world > 1:
        ids = [d.device.index] if d.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    return keyed_generator(f"{seed}:{step}:{micro}:{rank}", device)


@dataclass
class StepContext:
    """What a step function may use: its step, and the only random generator it should draw from."""

    step: int
    micro: int
    generator: torch.Generator
    device: torch.device

    def randn(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=self.device)

    def rand(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=self.generator, device=self.device)


@dataclass
class Part:
    """One optimised component: a (possibly DDP-wrapped) module, its optimizer, optional EMA.

    The step function returns a loss under the part's name; only that part's parameters receive
    its gradients (backward with `inputs=`), so a generator's adversarial term never trains the
    discriminator.
    """

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    ema_decay: float | None = None
    ema: dict[str, torch.Tensor] | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if self.ema_decay is not None and self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in unwrap(self.module).state_dict().items()}

    def update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.ema_decay
        with torch.no_grad():
            for k, v in unwrap(self.module).state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].mul_(d).add_(v.detach(), alpha=1 - d)  # type: ignore[operator]
                else:
                    self.ema[k].copy_(v)


def lr_lambda(cfg: StageTrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    return f


StepFn = Callable[[StepContext, torch.Tensor], dict[str, torch.Tensor]]


class Trainer:
    def __init__(
        self,
        run_dir: str | Path,
        cfg: StageTrainConfig,
        parts: list[Part],
        step_fn: StepFn,
        data: torch.Tensor,
        d: Dist,
        *,
        validate: Callable[[int], dict[str, float]] | None = None,
        name: str = "train",
        fingerprint: str | None = None,
    ):
        """`fingerprint` names what this training is (its configs, its data, the stage before it):
        a checkpoint made under another fingerprint is not resumed from, the run starts over."""
        self.run_dir = Path(run_dir)
        self.fingerprint = fingerprint
        self.cfg, self.parts, self.step_fn, self.data, self.d = cfg, parts, step_fn, data, d
        self.validate, self.name = validate, name
        for p in parts:
            if p.scheduler is None:
                p.scheduler = torch.optim.lr_scheduler.LambdaLR(p.optimizer, lr_lambda(cfg))
        self.amp = autocast_dtype(cfg.amp, d.device)  # medgen.models.precision: what each setting means
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.amp == torch.float16)
        self.sampler = StepSampler(len(data), cfg.batch_size, cfg.seed, d.rank, d.world)
        self.step = 0
        self.nan_count = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._writer: Any = None  # a SummaryWriter once opened, False where tensorboard is missing

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        np_state = np.random.get_state(legacy=True)
        assert isinstance(np_state, tuple)  # legacy: (name, keys, pos, has_gauss, gauss)
        return {
            "step": self.step,
            "nan_count": self.nan_count,
            "parts": {
                p.name: {
                    "model": unwrap(p.module).state_dict(),
                    "optimizer": p.optimizer.state_dict(),
                    "scheduler": p.scheduler.state_dict() if p.scheduler else None,
                    "ema": p.ema,
                }
                for p in self.parts
            },
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
                "python": list(random.getstate()[1]) + [random.getstate()[0]],
            },
            "config": self.cfg.model_dump(mode="json"),
            "fingerprint": self.fingerprint,
        }

    def save(self) -> Path:
        path = self.run_dir / CHECKPOINT
        if self.d.is_main:
            with atomic_path(path) as tmp:
                torch.save(self.state(), tmp)
        if self.d.world > 1:
            dist.barrier()
        return path

    def resume(self) -> bool:
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.d.device, weights_only=True)
        if self.fingerprint is not None and state.get("fingerprint") != self.fingerprint:
            # Resuming would hand a finished (or half) run of other data or configs to this one.
            if self.d.is_main:
                print(
                    f"[{self.name}] checkpoint in {self.run_dir} is from another config or data set: starting over",
                    file=sys.stderr,
                )
                path.unlink()
                self.metrics_path.unlink(missing_ok=True)
            if self.d.world > 1:
                dist.barrier()
            return False
        for p in self.parts:
            s = state["parts"][p.name]
            unwrap(p.module).load_state_dict(s["model"])
            p.optimizer.load_state_dict(s["optimizer"])
            if p.scheduler is not None and s["scheduler"] is not None:
                p.scheduler.load_state_dict(s["scheduler"])
            if s["ema"] is not None:
                p.ema = {k: v.to(self.d.device) for k, v in s["ema"].items()}
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([r.cpu() for r in rng["cuda"]])
        n = rng["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        py = rng["python"]
        random.setstate((py[-1], tuple(py[:-1]), None))
        self.step, self.nan_count = int(state["step"]), int(state["nan_count"])
        return True

    # ------------------------------------------------------------------ logging

    def _log(self, values: dict[str, float]) -> None:
        if not self.d.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; an environment without it still trains
                self._writer = False
        if self._writer:
            for k, v in values.items():
                self._writer.add_scalar(f"{self.name}/{k}", v, self.step)

    def plot(self) -> Path | None:
        """Loss curves as a PNG beside the metrics (rank 0)."""
        if not self.d.is_main or not self.metrics_path.exists():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keys = sorted({k for r in rows for k in r if k.startswith("loss")})
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
            if pts:
                ax.plot(*zip(*pts), label=k)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.set_title(f"{self.name} losses")
        ax.legend()
        out = self.run_dir / "loss_curve.png"
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        return out

    # ------------------------------------------------------------------ the loop

    def _all_finite(self, ok: bool) -> bool:
        if self.d.world == 1:
            return ok
        t = torch.tensor([1.0 if ok else 0.0], device=self.d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def fit(self, stop_after: int | None = None) -> int:
        """Train to `cfg.steps` (resuming from the run's checkpoint). `stop_after` stops early after
        that many steps, with a checkpoint, as a kill would (used by tests)."""
        cfg, d = self.cfg, self.d
        if self.resume() and d.is_main:
            print(f"[{self.name}] resumed at step {self.step}", file=sys.stderr)
        for p in self.parts:
            p.module.train()
        t_last, tty = time.perf_counter(), d.is_main and sys.stderr.isatty()
        sums: dict[str, float] = {}
        while self.step < cfg.steps:
            if stop_after is not None and self.step >= stop_after:
                self.save()
                return self.step
            losses = self._one_step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                now = time.perf_counter()
                values = {k: v / n for k, v in sums.items()}
                values["sec_per_step"] = (now - t_last) / n
                values["lr"] = self.parts[0].optimizer.param_groups[0]["lr"]
                values["nan_skipped"] = float(self.nan_count)
                self._log(values)
                if d.is_main:
                    shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k.startswith("loss"))
                    end = "\r" if tty else "\n"
                    print(
                        f"[{self.name}] step {self.step}/{cfg.steps} {shown} ({values['sec_per_step']:.3f} s/step)",
                        end=end,
                        file=sys.stderr,
                    )
                sums, t_last = {}, now
            if self.validate and cfg.val_every and self.step % cfg.val_every == 0 and self.step < cfg.steps:
                self._validate()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        if self.validate:
            self._validate()
        if d.is_main and tty:
            print(file=sys.stderr)
        self.plot()
        return self.step

    def _validate(self) -> None:
        for p in self.parts:
            p.module.eval()
        values = self.validate(self.step)  # type: ignore[misc]
        self._log({f"val/{k}": v for k, v in values.items()})
        for p in self.parts:
            p.module.train()

    def _one_step(self) -> dict[str, float]:
        cfg, d = self.cfg, self.d
        for p in self.parts:
            p.optimizer.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        finite = True
        stepped: set[str] = set()
        for micro in range(cfg.grad_accum):
            idx = self.sampler.indices(self.step, micro, cfg.grad_accum)
            batch = self.data[idx].to(d.device, non_blocking=True)
            ctx = StepContext(self.step, micro, step_generator(cfg.seed, self.step, micro, d.rank, d.device), d.device)
            last = micro == cfg.grad_accum - 1
            with contextlib.ExitStack() as stack:
                if not last and d.world > 1:  # all-reduce gradients only on the last micro-batch
                    for p in self.parts:
                        if isinstance(p.module, nn.parallel.DistributedDataParallel):
                            stack.enter_context(p.module.no_sync())
                with torch.autocast(d.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    losses = self.step_fn(ctx, batch)
                for p in self.parts:
                    loss = losses.get(p.name)
                    if loss is None:
                        continue
                    stepped.add(p.name)
                    if not torch.isfinite(loss.detach()).all():
                        finite = False
                        continue
                    self.scaler.scale(loss / cfg.grad_accum).backward(inputs=p.params)
            for k, v in losses.items():
                key = k if k.startswith(("loss", "metric")) else f"loss/{k}"
                logged[key] = logged.get(key, 0.0) + float(v.detach()) / cfg.grad_accum

        active = [p for p in self.parts if p.name in stepped]
        if finite:
            for p in active:
                self.scaler.unscale_(p.optimizer)
                if cfg.grad_clip:
                    norm = torch.nn.utils.clip_grad_norm_(p.params, cfg.grad_clip)
                    finite &= bool(torch.isfinite(norm))
                else:
                    finite &= all(torch.isfinite(q.grad).all() for q in p.params if q.grad is not None)
        if not self._all_finite(finite):
            self.nan_count += 1
            for p in self.parts:
                p.optimizer.zero_grad(set_to_none=True)
            if self.amp == torch.float16:
                self.scaler.update()  # fp16 overflow: let the scaler lower its scale
            if self.nan_count > cfg.nan_limit:
                raise TrainingDivergedError(
                    f"{self.name}: {self.nan_count} steps with non-finite loss or gradients (limit {cfg.nan_limit}), "
                    f"last at step {self.step}; lower the learning rate, check the data, or use amp: none"
                )
            if d.is_main:
                print(
                    f"[{self.name}] step {self.step}: non-finite loss/gradients, step skipped ({self.nan_count}/{cfg.nan_limit})",
                    file=sys.stderr,
                )
            return {}
        for p in active:
            self.scaler.step(p.optimizer)
        self.scaler.update()
        for p in active:
            if p.scheduler is not None:
                p.scheduler.step()
            p.update_ema()
        return logged


def digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters (bitwise), to compare ranks or runs."""
    h = hashlib.sha256()
    for k, v in sorted(unwrap(module).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
