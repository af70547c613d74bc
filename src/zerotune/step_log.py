"""Reading launched steps back: their loss, gradient norm and whether the update was kept; the non-finite policy
(--on-nonfinite); the per-step metrics the tracker logs. The training loop (zerotune.train) hands it each step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from zerotune.errors import ZerotuneError
from zerotune.step_io import LaunchedStep, WorkDone

if TYPE_CHECKING:
    from zerotune.train import Run


class NonFiniteError(ZerotuneError):
    """A NaN or Inf loss or gradient norm."""


class StepLog:
    """Reads launched steps back (their loss, gradient norm and whether the update was kept), applies the
    non-finite policy, and logs. A step is read one step late where the engine drops a bad update on the device,
    so the host never stalls the GPU queue; it is timed from the end of the previous step's work to the end of
    its own: wall time, idle gaps and batching on the CPU included."""

    def __init__(self, training: Run):
        self.training = training
        self.pending: list[LaunchedStep] = []
        self.previous_done = WorkDone(training.strategy.device)

    def add(self, launched: LaunchedStep) -> None:
        self.pending.append(launched)
        while len(self.pending) > (1 if self.training.strategy.drops_steps_on_device else 0):
            self._finish(self.pending.pop(0))

    def settle(self) -> None:
        """Every launched step read back: its loss known and its update checked before anything is written."""
        while self.pending:
            self._finish(self.pending.pop(0))

    def restart_clock(self) -> None:
        """The next step's time leaves out what ran since the last step (evaluation, saving)."""
        self.previous_done = WorkDone(self.training.strategy.device)

    def _finish(self, launched: LaunchedStep) -> None:
        training = self.training
        config, result, tracker = training.config, training.result, training.tracker
        label_tokens, input_tokens, slots = launched.info.values()[:3]
        loss_sum, grad_norm, applied = launched.outcome.values()
        elapsed, self.previous_done = launched.done.seconds_since(self.previous_done), launched.done
        step = launched.step + 1
        objective_metrics = launched.named_metrics()  # a preference step's loss, terms and rewards
        loss = objective_metrics.pop("loss") if objective_metrics else loss_sum / max(label_tokens, 1.0)
        if not applied or not math.isfinite(grad_norm):
            self._non_finite(step, f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}")
        result.losses.append(loss)
        if step % config.train.log_every == 0 or step == training.total_steps:
            tracker.log(step, {
                "loss": loss, "lr": launched.lr, "grad_norm": grad_norm,
                # a stream's length is unknown (--streaming): its steps have no epoch
                **({"epoch": launched.step / training.plan.steps_per_epoch} if training.plan.steps_per_epoch else {}),
                "tokens_per_second": input_tokens / elapsed, "step_seconds": elapsed,
                "label_tokens": label_tokens, "skipped_steps": result.skipped_steps,
                "real_token_fraction": input_tokens / slots, **memory_metrics(training.strategy.device),
                **objective_metrics,
            })

    def _non_finite(self, step: int, what: str) -> None:
        """--on-nonfinite: stop, or count the skipped update (the engine did not apply it) up to a limit."""
        config, result, tracker = self.training.config, self.training.result, self.training.tracker
        result.skipped_steps += 1
        if config.train.on_nonfinite == "stop":
            tracker.finish(status="FAILED")
            raise NonFiniteError(f"step {step}: {what}; the update was not kept and no checkpoint holds it. "
                                 "Lower --lr, check the data, or pass --on-nonfinite skip")
        tracker.note(f"step {step}: {what}; step skipped ({result.skipped_steps} so far)")
        if result.skipped_steps >= config.train.max_skipped_steps:
            tracker.finish(status="FAILED")
            raise NonFiniteError(f"step {step}: {result.skipped_steps} steps had a non-finite loss or gradient "
                                 f"(train.max_skipped_steps {config.train.max_skipped_steps}); lower --lr or "
                                 "check the data")


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
