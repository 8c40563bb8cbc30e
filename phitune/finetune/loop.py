"""The training loop: AdamW on the LoRA weights, gradient accumulation, linear warmup and
decay, checkpoints that survive an interruption, data parallel under torchrun.

A step's loss is the mean over its labelled tokens however its rows are cut into passes
(micro-batches, accumulation steps): each pass adds its summed loss over the step's count.

The data order is a function of (seed, step) alone, so a resumed run sees exactly the rows
the uninterrupted one would have, and every rank can find its share without coordination.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from phitune import inputfiles
from phitune.errors import InputError, first_line
from phitune.finetune.layer_compile import eager
from phitune.finetune.loss import CausalLMLoss, labelled_tokens


@dataclass
class TrainConfig:
    max_steps: int = -1            # > 0 wins over epochs
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-4
    batch_size: int = 4            # rows per device per micro-batch
    grad_accum: int = 1
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 42
    save_steps: int = 50
    eval_batch_size: int = 8
    autocast_dtype: torch.dtype | None = None
    micro_batch_rows: int | None = None  # rows per forward/backward pass; None: the whole batch
    eval_steps: int = 0            # > 0: `evaluate` after every this many steps (not the last)
    optim_state_dtype: torch.dtype = torch.float32  # AdamW moments (bf16: half the memory)


@dataclass
class World:
    """This process's place in a torchrun / accelerate launch (one process when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> "World":
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        import torch.distributed as dist
        if device == "cuda":  # this rank's GPU before NCCL starts: else every rank takes GPU 0
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        return cls(dist.get_rank(), size)

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss) in training


def total_steps(n_rows: int, cfg: TrainConfig, world: World) -> int:
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * world.size
    return max(1, math.ceil(cfg.num_train_epochs * n_rows / per_step))


def row_indices(step: int, n_rows: int, cfg: TrainConfig, world: World) -> list[list[int]]:
    """This rank's micro-batches (lists of row indices) for optimizer step `step`."""
    per_step = cfg.batch_size * cfg.grad_accum * world.size
    start = step * per_step
    flat = [_epoch_order(pos // n_rows, n_rows, cfg.seed)[pos % n_rows]
            for pos in range(start, start + per_step)]
    mine = flat[world.rank::world.size]
    return [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]


@lru_cache(maxsize=4)
def _epoch_order(epoch: int, n_rows: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n_rows, generator=g).tolist()


def real_tokens(row: dict) -> int:
    """Tokens that are not padding (packed rows list their example lengths)."""
    return sum(row["lengths"]) if "lengths" in row else len(row["input_ids"])


class Checkpoint:
    """Training state kept beside the output, for --resume after an interruption."""

    def __init__(self, directory: Path, key: str):
        self.dir = Path(directory)
        self.key = key
        self.file = self.dir / "state.pt"

    def load(self, damaged_ok: bool = False) -> dict | None:
        """The saved state of a run with this key, or None. A file that does not read whole
        (cut by a full disk, a copy) is refused: training never goes on from half a state;
        `damaged_ok` (a run starting over anyway) treats it as absent."""
        if not self.file.exists():
            return None
        try:
            inputfiles.check_regular(self.file, "--resume")
            # on the CPU: the optimizer and copy_ move each value to its parameter's device, and a
            # checkpoint written on a GPU still loads where there is none
            state = torch.load(self.file, weights_only=False, map_location="cpu")
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError("no training step in it")
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
                AttributeError, KeyError, InputError) as exc:
            if damaged_ok:
                return None
            raise InputError(f"the finetune checkpoint {self.file} is damaged "
                             f"({first_line(exc, 120).split('. ')[0]})", "--resume",
                             "run with --force (or without --resume) to start over") from None
        return state if state.get("key") == self.key else None

    def save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, self.file)

    def remove(self) -> None:
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def eval_loss(model, rows: Sequence[dict], collate: Callable, cfg: TrainConfig, device: str) -> float | None:
    """Token-weighted mean loss over the eval rows (None without eval rows)."""
    if not rows:
        return None
    was_training = model.training
    model.eval()
    size = cfg.micro_batch_rows or cfg.eval_batch_size
    total, count = 0.0, 0
    for i in range(0, len(rows), size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + size]).items()}
        with _autocast(device, cfg.autocast_dtype), eager():
            total += CausalLMLoss(model)(**batch, reduction="sum").float().item()
        count += sum(labelled_tokens(r["labels"]) for r in rows[i:i + size])
    model.train(was_training)
    return total / max(count, 1)


def micro_batches(batches: list[list[int]], rows_per_pass: int | None) -> list[list[int]]:
    """The step's batches cut into passes of at most `rows_per_pass` rows. The loss is weighted
    by labelled tokens, so the cut changes memory and speed, not the gradient."""
    if not rows_per_pass:
        return batches
    return [b[i:i + rows_per_pass] for b in batches for i in range(0, len(b), rows_per_pass)]


def _autocast(device: str, dtype):
    if dtype is None:
        return torch.autocast(device_type=device, enabled=False)
    return torch.autocast(device_type=device, dtype=dtype)


def train(model, rows: Sequence[dict], collate: Callable, cfg: TrainConfig, device: str,
          world: World, checkpoint: Checkpoint, resume: bool,
          on_step: Callable[[int, int, float, float], None] | None = None,
          evaluate: Callable[[int], float | None] | None = None) -> TrainResult:
    """Train the model's trainable (LoRA) parameters in place; returns the loss history.
    `evaluate(step)` runs every `cfg.eval_steps` steps (eval mode, no dropout: it draws no
    random numbers, so training is the same with or without it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    steps = total_steps(len(rows), cfg, world)
    optimizer, scheduler = _optimizer(params, cfg, steps)
    result = TrainResult(steps=steps)
    state = checkpoint.load() if resume else None
    if state:
        _restore(state, model, optimizer, scheduler, result)
    loss_model = _loss_model(model, world)

    model.train()
    began = time.perf_counter()
    tokens_before = result.tokens
    step = result.resumed_from
    with _stop_on_sigint() as stop:
        while step < steps:
            step_loss, step_tokens = _accumulate(loss_model, rows, collate, step, cfg, device, world)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(_mean_over_ranks(step_loss, world))
            result.tokens += step_tokens * world.size
            if on_step:
                on_step(step, steps, result.losses[-1],
                        (result.tokens - tokens_before) / max(time.perf_counter() - began, 1e-9))
            if evaluate and cfg.eval_steps and step % cfg.eval_steps == 0 and step < steps:
                paused = time.perf_counter()
                value = evaluate(step)
                if value is not None:
                    result.evals.append((step, value))
                began += time.perf_counter() - paused  # tok/s counts training time only
            interrupted = stop.requested and step < steps
            if world.main and (interrupted or cfg.save_steps and step % cfg.save_steps == 0
                               and step < steps):
                checkpoint.save(_snapshot(step, model, optimizer, scheduler, result))
            if interrupted:
                raise KeyboardInterrupt
    result.seconds = time.perf_counter() - began
    return result


def _optimizer(params: list, cfg: TrainConfig, steps: int):
    """AdamW and its schedule: linear warmup over `warmup_steps`, then linear decay to 0."""
    if cfg.optim_state_dtype == torch.float32:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      fused=fusable(params))
    else:
        from phitune.finetune.optim import AdamW
        optimizer = AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                          state_dtype=cfg.optim_state_dtype)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (steps - step) / max(1, steps - cfg.warmup_steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def fusable(params: list) -> bool:
    """Whether AdamW can run fused: one kernel per parameter instead of a dozen elementwise ops
    (torch's default on CPU is a Python loop over them), the same update up to float rounding.
    A small model's step is overhead-bound, and the optimizer is a visible share of it."""
    return bool(params) and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                                and p.device.type in ("cpu", "cuda") for p in params)


def _restore(state: dict, model, optimizer, scheduler, result: TrainResult) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, RNG and the history so far."""
    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    result.resumed_from = state["step"]
    result.losses = state["losses"]
    result.tokens = state["tokens"]
    result.evals = [tuple(e) for e in state.get("evals", [])]


def rng_state() -> dict:
    """The generators a step draws from: the CPU's, and the GPUs' where CUDA is in use (LoRA
    dropout on CUDA draws from the device's generator, so a resumed CUDA run without it would
    drop other units than the uninterrupted one)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state) -> None:
    """Restore what rng_state() saved (a bare tensor: a checkpoint from before CUDA's was kept)."""
    if isinstance(state, torch.Tensor):
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _snapshot(step: int, model, optimizer, scheduler, result: TrainResult) -> dict:
    """State after `step` whole steps, taken between steps."""
    return {"step": step, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "losses": list(result.losses), "tokens": result.tokens,
            "evals": list(result.evals)}


def _loss_model(model, world: World):
    """The model returning its loss, wrapped for data parallel when there are several ranks."""
    loss_model = CausalLMLoss(model)
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel
        # No buffer broadcast per forward: a packed int4 base keeps its weights in buffers
        # (frozen, identical on every rank; DDP checks them once at construction).
        on_gpu = next(model.parameters()).is_cuda
        loss_model = DistributedDataParallel(
            loss_model, device_ids=[torch.cuda.current_device()] if on_gpu else None,
            broadcast_buffers=False)
    return loss_model


def _accumulate(loss_model, rows: Sequence[dict], collate: Callable, step: int, cfg: TrainConfig,
                device: str, world: World) -> tuple[float, int]:
    """Gradients of step `step` over this rank's rows, pass by pass; returns (this rank's
    loss, its real tokens). Ranks synchronise gradients on the last pass only."""
    micro = micro_batches(row_indices(step, len(rows), cfg, world), cfg.micro_batch_rows)
    labelled = max(1, sum(labelled_tokens(rows[j]["labels"]) for m in micro for j in m))
    step_loss, step_tokens = 0.0, 0
    for i, indices in enumerate(micro):
        batch_rows = [rows[j] for j in indices]
        batch = {k: v.to(device) for k, v in collate(batch_rows).items()}
        sync = i == len(micro) - 1 or world.size == 1
        context = loss_model.no_sync() if not sync else nullcontext()
        with context:
            with _autocast(device, cfg.autocast_dtype):
                # this pass's share of the step's token-mean loss
                loss = loss_model(**batch, reduction="sum") / labelled
            loss.backward()
        step_loss += loss.item()
        step_tokens += sum(real_tokens(r) for r in batch_rows)
    return step_loss, step_tokens


def _mean_over_ranks(value: float, world: World) -> float:
    """The step's loss over the whole global batch, not only this rank's share."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t)
    return t.item() / world.size


def _collective_device() -> str:
    """Where a tensor must be for a collective: NCCL reduces only CUDA tensors (a CPU one
    fails the first step of a multi-GPU run), gloo CPU ones."""
    return "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"


class _StopRequest:
    requested = False


@contextmanager
def _stop_on_sigint() -> Iterator[_StopRequest]:
    """The first Ctrl-C finishes the current step, saves a checkpoint and stops; a second one
    stops at once (the last periodic checkpoint stays)."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(_signum, _frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
