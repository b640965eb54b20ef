"""The first non-finite loss or gradient norm of a run, watched on the device without a host sync per step.

Each micro-step's loss and each optimizer step's gradient norm update small device tensors (the first
bad step and its value); the host reads them only where the run would act on them (a logging or
checkpoint step, the end), so the stop stays exact: the step named is the first bad one, and no
checkpoint after it is kept. Ranks agree through one all-reduce at those steps.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

NONE = 2**62  # "no bad step yet"; the minimum over ranks picks the first bad one


class NonFiniteWatch:
    def __init__(self) -> None:
        self._first: Optional[torch.Tensor] = None  # [loss step, grad-norm step]
        self._value: Optional[torch.Tensor] = None  # the bad loss and gradient norm, as first seen

    def _init(self, device: torch.device) -> None:
        if self._first is None:
            self._first = torch.full((2,), NONE, dtype=torch.long, device=device)
            self._value = torch.zeros(2, dtype=torch.float32, device=device)

    def _observe(self, slot: int, value: torch.Tensor, step: int) -> None:
        self._init(value.device)
        value = value.detach().float()
        bad = ~torch.isfinite(value).all() & (self._first[slot] == NONE)
        self._first[slot] = torch.where(bad, torch.full_like(self._first[slot], step), self._first[slot])
        self._value[slot] = torch.where(bad, value.reshape(-1)[0], self._value[slot])

    def observe_loss(self, loss: torch.Tensor, step: int) -> None:
        """``step``: the optimizer step this micro-step's gradients go into."""
        self._observe(0, loss.mean() if loss.numel() > 1 else loss, step)

    def observe_grad_norm(self, grad_norm: Any, step: int, device: torch.device) -> None:
        if grad_norm is not None:
            self._observe(1, torch.as_tensor(grad_norm, device=device), step)

    def verdict(self, device: torch.device, world_size: int = 1) -> Optional[tuple[int, str]]:
        """(step, what became non-finite) for the first bad step on any rank, else None; a host sync (and, with
        several ranks, an all-reduce every rank must join)."""
        self._init(device)
        first = self._first.clone()
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        loss_step, grad_step = (int(v) for v in first.tolist())
        local_loss, local_grad = (int(v) for v in self._first.tolist())
        if loss_step == NONE and grad_step == NONE:
            return None
        if loss_step <= grad_step:
            value = float(self._value[0]) if local_loss == loss_step else None
            return loss_step, ("the loss became non-finite on another rank" if value is None
                               else f"the loss became {value}")
        value = float(self._value[1]) if local_grad == grad_step else None
        return grad_step, ("the gradient norm became non-finite on another rank" if value is None
                           else f"the gradient norm became {value}")
