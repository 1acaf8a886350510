"""LiSA adapters under multi-process training (``accelerate launch`` with DDP or FSDP2).

:class:`peft_lisa.training.LiSATrainer` runs unchanged under DDP and FSDP2 (``fsdp_version: 2``): the logits carrier
hands tensors between decoder layers inside one process's forward pass, and FSDP2 (``fully_shard``) keeps the
original parameter names (no ``_fsdp_wrapped_module`` prefix), so the adapter's keys are those of one process. What
needs care is reading the adapter *out* of a sharded model: each rank holds only a slice of every parameter.
:func:`gather_adapter_state_dict` gathers the full adapter tensors (a collective: call it on every rank).
"""

from __future__ import annotations

import time
from typing import Any

import torch

ADAPTER_KEY = "lisa_"
# How long end_process_group releases the GIL before destroying the group (see there).
GLOO_SETTLE_SECONDS = 0.2


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


def end_process_group() -> None:
    """Leave the process group of an ``accelerate launch`` run once this process's collectives are done; a no-op in
    a single process. Call it on every rank at the end of its work.

    Left to the interpreter's exit, the group's teardown sometimes aborted a rank after its work was done
    ("terminate called without an active exception"). Destroying it right after the last collective can deadlock
    instead: gloo's worker thread may still be releasing that collective's tensors, which takes the GIL, while the
    group's destructor joins it holding the GIL. So this releases the GIL for ``GLOO_SETTLE_SECONDS`` first.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    time.sleep(GLOO_SETTLE_SECONDS)
    torch.distributed.destroy_process_group()
