"""Count what a training step costs in UNet forwards: latents through a module's forward, with and without gradient."""

from __future__ import annotations

import torch


class UNetCallCounter:
    """Context manager counting the latents (batch rows) that pass through ``module``'s forward.

    ``grad``: rows run with gradient enabled (each also costs a backward pass, about 2 forwards); ``no_grad``: rows without.
    A classifier-free-guided call on B latents counts 2B rows (both branches go through the UNet).

        with UNetCallCounter(pipeline.unet) as calls:
            loss, _ = trainer.compute_loss(batch, generators)
        print(calls.grad, calls.no_grad)
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.grad = 0
        self.no_grad = 0
        self._handle = None

    def _hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        if torch.is_grad_enabled():
            self.grad += int(sample.shape[0])
        else:
            self.no_grad += int(sample.shape[0])

    def __enter__(self) -> "UNetCallCounter":
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


__all__ = ["UNetCallCounter"]
