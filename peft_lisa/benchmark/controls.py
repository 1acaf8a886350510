"""Control subjects that separate LiSA's share of a speedup from the implementation's.

A merged model decodes every layer through the CPU kernel's decode rows, its full layers included
(:class:`~peft_lisa.tuner.LiSAFullAttention`), while its base decodes through the model's attention implementation
(sdpa). On CPUs where torch's sdpa of one query row is slow (bf16 without AMX), most of the merged model's decode
speedup is then the rows', not the sharing's. :func:`base_on_decode_rows` builds the base with every layer on the same
rows: the merged model timed against it shows what sharing alone buys (``docs/benchmark/control``, the geometry
benchmark's ``base rows`` subject).
"""

from __future__ import annotations

import torch
from torch import nn

from ..tuner import LiSAFullAttention, LiSALayer, LiSASharedAttention
from ..tuner.architectures import decoder_layers, describe_model_attention
from ..tuner.cpu_kernel import cpu_kernel_status

# What a decoder layer's self_attn is once LiSA is in the model: the adapter's wrapper or a merged model's modules.
_LISA_ATTENTION = (LiSALayer, LiSAFullAttention, LiSASharedAttention)


def base_on_decode_rows(model: nn.Module) -> nn.Module:
    """``model``, a plain base model, with every decoder layer's attention a :class:`LiSAFullAttention` over the
    layer's own projections (in place; returned for chaining).

    Prefill still runs through the model's attention implementation; decode steps on CPU run through the kernel's
    decode rows, as a merged model's full layers do. The weights are not copied, and the model computes what it
    computed before (``tests/test_decode_rows.py``). Raises ``ValueError`` on a model that has LiSA layers already (an
    adapter model or a merged model), whose layers are not the base's own.
    """
    fix = "pass the plain base model (a second AutoModelForCausalLM.from_pretrained of it)"
    if getattr(model, "peft_config", None):
        raise ValueError(f"base_on_decode_rows: got a PEFT model ({type(model).__name__}); {fix}")
    layers = decoder_layers(model)
    taken = [idx for idx, layer in enumerate(layers) if isinstance(layer.self_attn, _LISA_ATTENTION)]
    if taken:
        raise ValueError(f"base_on_decode_rows: layers {taken} are LiSA layers already (a merged model?); {fix}")
    layouts = describe_model_attention(model)  # probes every layer; refuses a layout LiSA cannot reproduce
    for idx, layer in enumerate(layers):
        layer.self_attn = LiSAFullAttention(layer.self_attn, None, layouts[idx])
    return model


def decode_rows_in_use(device: torch.device) -> bool:
    """Whether inference on ``device`` decodes through the kernel's rows: on CPU with the kernel built (not
    ``PEFT_LISA_CPU_KERNEL=off``, a compiler found). Elsewhere :func:`base_on_decode_rows` decodes as the base does,
    and a control built with it times the base twice."""
    return device.type == "cpu" and cpu_kernel_status() == "used"


def on_decode_rows(model: nn.Module) -> bool:
    """Whether ``model`` is a base that :func:`base_on_decode_rows` made a control: every layer a
    :class:`LiSAFullAttention` (a merged model's source and shared layers are other classes)."""
    layers = decoder_layers(model)
    return bool(layers) and all(type(layer.self_attn) is LiSAFullAttention for layer in layers)


def plain_full_layers(model: nn.Module) -> list[int]:
    """The layers of a merged model that keep the base's attention module (no LiSA class): full layers of a file
    merged before full layers' layouts were saved, which decode through the model's attention implementation, not the
    kernel's rows (merge the adapter again to give them the rows)."""
    return [
        idx
        for idx, layer in enumerate(decoder_layers(model))
        if not isinstance(layer.self_attn, (LiSAFullAttention, LiSASharedAttention))
    ]
