"""Where training's loss curve goes: the manifest's `history` always (Hugging Face Trainer's
`log_history` shape: `{"step", "loss"}` per optimizer step, `{"step", "eval_loss"}` per eval),
and with `--report_to tensorboard` event files as the Trainer writes them: scalars `train/loss`
and `eval/loss` by step, read by `tensorboard --logdir OUTPUT`.

The output dir appears only when training is done (artifacts/output.py stages it), so the event files
are written live beside the resume checkpoint (`.OUTPUT.phitune-ckpt/runs`, where `tensorboard
--logdir` can watch them) and move into `OUTPUT/runs` when the output is published. A resumed
run appends to them, purging what the interrupted run logged after its last checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from phitune.errors import OptionError

REPORTERS = ("none", "tensorboard")
RUNS = "runs"  # the output's subdirectory, as Hugging Face's Trainer names it
INSTALL = "pip install 'phitune[tensorboard]' (or pip install tensorboard)"


def check(report_to: str) -> None:
    """Refuse before any data or model loads when the reporter's package is missing."""
    if report_to != "tensorboard":
        return
    try:
        import tensorboard  # noqa: F401  (light: its modules load lazily)
    except ImportError:
        raise OptionError("--report_to tensorboard needs the tensorboard package, which is not "
                          "installed", "--report_to", INSTALL) from None


def history(result, before: float | None, after: float | None) -> list[dict]:
    """A training result's per-step train loss (step i+1 is losses[i]) and its evals (before,
    every --eval_steps, after), in step order."""
    evals = [(0, before), *result.evals, (result.steps, after)]
    evals = [(step, loss) for step, loss in evals if loss is not None]
    rows = [{"step": i + 1, "loss": round(loss, 4)} for i, loss in enumerate(result.losses)]
    rows += [{"step": step, "eval_loss": round(loss, 4)} for step, loss in evals]
    return sorted(rows, key=lambda r: (r["step"], "loss" not in r))


class Report:
    """The live event writer of one training run (nothing unless --report_to tensorboard, and
    only on the process that writes the output)."""

    def __init__(self, report_to: str, live_dir: Path, resumed_from: int, main: bool):
        self.live_dir = Path(live_dir)
        self.writer = None
        if report_to != "tensorboard" or not main:
            return
        from torch.utils.tensorboard import SummaryWriter
        if not resumed_from:  # starting over: an interrupted run's curve is not this one's
            shutil.rmtree(self.live_dir, ignore_errors=True)
        self.writer = SummaryWriter(str(self.live_dir),
                                    purge_step=resumed_from + 1 if resumed_from else None)

    def train(self, step: int, loss: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)

    def eval(self, step: int, loss: float | None) -> None:
        if self.writer is not None and loss is not None:
            self.writer.add_scalar("eval/loss", loss, step)
            self.writer.flush()  # evals are rare: show them at once

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def publish(self, work: Path) -> None:
        """Move the event files into the output being staged."""
        self.close()
        if self.writer is not None and self.live_dir.is_dir():
            shutil.move(str(self.live_dir), str(work / RUNS))
