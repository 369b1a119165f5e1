"""The non-finite guard: a step whose loss or gradient norm is NaN or infinite never reaches the
weights. Every rank decides the same way at the same step, so they stay in step and identical.

- DDP / one process: the gradient norm (of the all-reduced gradients, so the same on every rank)
  and this rank's loss give a flag; one 1-element all-reduce (MAX) agrees on it; a flagged step
  only clears the gradients. The flag travels to the host with the step's losses (one read).
- DeepSpeed ZeRO-1/2/3 steps inside `accelerator.backward`; its optimizer already computes the
  global gradient norm and discards a step whose norm is not finite (fp32 always, bf16 with
  `bf16.check_grad_overflow`, on by default) and reports it as `overflow`. The guard reads that.

A skipped step still counts as a step (its data is consumed; the learning-rate schedule does not
advance, as DeepSpeed's does not). After `max_in_a_row` skipped steps in a row the run stops with
NonFiniteError on every rank: its last checkpoint, written before, is intact.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from cmaclip.errors import CmaclipError


class NonFiniteError(CmaclipError):
    """Too many non-finite steps in a row: the run diverged."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0  # non-finite steps of this run (since its start or resume)

    def step(self, model, optimizer, accelerator, grad_clip: float, losses: torch.Tensor,
             deepspeed: bool) -> tuple[bool, list[float]]:
        """Apply the optimizer step unless the step is non-finite on any rank; zero the gradients.
        losses: this rank's [loss, *task losses] on the device. -> (applied, losses as floats)."""
        if deepspeed:  # the step already happened (or was discarded) in accelerator.backward
            bad = bool(optimizer.step_was_skipped)
        elif grad_clip > 0:
            bad = ~torch.isfinite(accelerator.clip_grad_norm_(model.parameters(), grad_clip))
        else:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        flag = (~torch.isfinite(losses).all() | bad).double().reshape(1)
        if accelerator.num_processes > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        skip, *values = torch.cat([flag, losses.double()]).tolist()
        if not deepspeed:
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self._count(bool(skip))
        return not skip, values

    def _count(self, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (NaN/inf), "
                f"all skipped: the run diverged. Lower optim.lr / optim.backbone_lr, or raise optim.warmup_steps, "
                f"and resume from the last checkpoint (its weights are finite); "
                f"train.max_nonfinite_steps sets how many in a row are tolerated")
