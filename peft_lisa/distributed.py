"""LiSA adapters under multi-process training (``accelerate launch`` with DDP or FSDP2).

:class:`peft_lisa.training.LiSATrainer` runs unchanged under DDP and FSDP2 (``fsdp_version: 2``): the logits carrier
hands tensors between decoder layers inside one process's forward pass, and FSDP2 (``fully_shard``) keeps the
original parameter names (no ``_fsdp_wrapped_module`` prefix), so the adapter's keys are those of one process. What
needs care is reading the adapter *out* of a sharded model: each rank holds only a slice of every parameter.
:func:`gather_adapter_state_dict` gathers the full adapter tensors (a collective: call it on every rank).
"""

from __future__ import annotations

from typing import Any

import torch

ADAPTER_KEY = "lisa_"


def gather_adapter_state_dict(trainer: Any) -> dict[str, torch.Tensor]:
    """The full (unsharded) LiSA adapter parameters of ``trainer.model``, on CPU, keyed by parameter name.

    ``trainer`` is a ``transformers.Trainer`` (e.g. :class:`~peft_lisa.training.LiSATrainer`) after ``train()``.
    Under FSDP2 the shards are gathered with ``Accelerator.get_state_dict`` (``full_state_dict=True``), which is a
    collective: **every rank must call this function**; under DDP or a single process it reads the local copy. Keys
    are the ``named_parameters()`` names of the unwrapped ``PeftModel`` (``...lisa_....default...``).
    """
    accelerator = trainer.accelerator
    state = accelerator.get_state_dict(trainer.model_wrapped if accelerator.is_fsdp2 else trainer.model)
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items() if ADAPTER_KEY in name}
