"""Each router's expert loads over the micro-batches of one optimizer step.

Two consumers, both once per optimizer step whatever the gradient accumulation:

- the global-batch balance loss (``router_balance_granularity="global_batch"``): each micro-batch's
  counts are summed over the processes as it runs (one collective per micro-batch) and added to the
  step's running sums, which give f (``trainers/losses.py`` ``global_batch_balance_loss``);
- the aux-loss-free expert bias: after the optimizer step, every router whose
  ``expert_bias_enabled`` gets ``update_expert_bias(counts_E)`` with the step's counts summed over
  micro-batches and processes (one collective per step, none when the balance loss has summed them
  already).

Counts are the top-k slots of the real tokens (padding excluded), int64: exact, and summed alike by
gloo and NCCL. The sums belong to the optimizer step they were taken in (``TrainerState.global_step``
while its micro-batches run): a micro-batch of another step starts new sums.

Shape legend: L routers, E experts (the widest router's; narrower rows are zero past their E).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import metrics as M
from ..reporting.collector import RouterCapture
from .routing_logs import ProcessSums

__all__ = ["StepLoads"]


class StepLoads:
    """Per router, the expert counts and real tokens of the current optimizer step's micro-batches.

    Attributes:
        step: the ``global_step`` these sums belong to (None: nothing taken since the last reset).
        micro_batches: micro-batches added in this step.
        local_LE, local_L: this process's counts ``[L, E]`` and real tokens ``[L]``.
        global_LE, global_L: the same summed over the processes, kept up to date by
            ``add(..., reduce=True)`` only (``reduced`` says whether every micro-batch was).
    """

    def __init__(self, num_experts: Sequence[int], sums: ProcessSums, device: torch.device | str):
        self.widths = tuple(int(e) for e in num_experts)
        self.sums = sums
        self.device = torch.device(device)
        shape = (len(self.widths), max(self.widths))
        self.local_LE = torch.zeros(shape, dtype=torch.int64, device=self.device)
        self.local_L = torch.zeros(shape[0], dtype=torch.int64, device=self.device)
        self.global_LE = torch.zeros_like(self.local_LE)
        self.global_L = torch.zeros_like(self.local_L)
        self.step: int | None = None
        self.micro_batches = 0
        self.reduced = True

    def reset(self, step: int | None = None) -> None:
        """Zero every sum; the next ones belong to optimizer step ``step``."""
        for tensor in (self.local_LE, self.local_L, self.global_LE, self.global_L):
            tensor.zero_()
        self.step = step
        self.micro_batches = 0
        self.reduced = True

    @torch.no_grad()
    def counts(
        self, captures: Sequence[RouterCapture | None], masks: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's counts ``[L, E]`` and real tokens ``[L]`` int64 (zeros for a router
        that did not run), on ``self.device``."""
        counts_LE = torch.zeros_like(self.local_LE)
        tokens_L = torch.zeros_like(self.local_L)
        for i, (capture, mask) in enumerate(zip(captures, masks)):
            if capture is None:
                continue
            indices_TK = capture.indices_TK.reshape(-1, capture.indices_TK.shape[-1])
            width = self.widths[i]
            counts_E = M.expert_counts(indices_TK, width, mask, dtype=torch.int64, validate=False)
            counts_LE[i, :width] = counts_E.to(self.device)
            tokens_L[i] = (
                indices_TK.shape[0]
                if mask is None
                else mask.reshape(-1).to(torch.int64).sum().to(self.device)
            )
        return counts_LE, tokens_L

    def add(
        self,
        captures: Sequence[RouterCapture | None],
        masks: Sequence[torch.Tensor | None],
        step: int,
        *,
        reduce: bool,
    ) -> torch.Tensor | None:
        """Add one training micro-batch of optimizer step ``step``.

        ``reduce=True`` sums its counts over the processes now (a collective: every process must
        call it for every micro-batch) and returns the micro-batch's real tokens per router over all
        processes ``[L]``; otherwise returns None.
        """
        if step != self.step:
            self.reset(step)
        counts_LE, tokens_L = self.counts(captures, masks)
        self.local_LE += counts_LE
        self.local_L += tokens_L
        self.micro_batches += 1
        if not reduce:
            self.reduced = False
            return None
        total = self.sums.exact_sum(torch.cat([counts_LE.reshape(-1), tokens_L])).to(self.device)
        self.global_LE += total[: counts_LE.numel()].view_as(counts_LE)
        batch_L = total[counts_LE.numel() :]
        self.global_L += batch_L
        return batch_L

    def step_totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's counts ``[L, E]`` and real tokens ``[L]`` summed over micro-batches and
        processes (one collective unless every micro-batch was reduced as it ran)."""
        if self.reduced:
            return self.global_LE, self.global_L
        packed = self.sums.exact_sum(torch.cat([self.local_LE.reshape(-1), self.local_L])).to(self.device)
        return packed[: self.local_LE.numel()].view_as(self.local_LE), packed[self.local_LE.numel() :]

    def router_counts(self, counts_LE: torch.Tensor, router: int) -> torch.Tensor:
        """Router ``router``'s row of ``counts_LE``, ``[E_router]``."""
        return counts_LE[router, : self.widths[router]]
