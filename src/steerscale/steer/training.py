"""What every learned steering method (LoFiT offsets, steering controllers, CASAL) shares while it trains: a frozen model,
and optimiser steps that stop on a non-finite loss with a message instead of writing NaN into the parameters."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import SteerscaleError


@contextmanager
def frozen(model):
    """Model weights stop asking for gradients for the duration, and get their flags back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, what: str, epoch: int, hint: str,
            unit: str = "epoch") -> None:
    """One step of ``opt`` on ``loss``; a NaN or infinite loss raises (before any parameter changes), naming the
    ``unit`` (epoch, step) numbered ``epoch`` (0-based) where it happened."""
    if not torch.isfinite(loss):
        raise SteerscaleError(f"{what} diverged: the loss became {float(loss.detach())} in {unit} {epoch + 1}", hint)
    opt.zero_grad()
    loss.backward()
    opt.step()
