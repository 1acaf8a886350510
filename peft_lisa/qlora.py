"""Merging a LiSA adapter trained on a quantized (QLoRA-style, bitsandbytes 4-bit NF4) base model.

``merge_and_unload()`` refuses a quantized base (its saved model would not reload: reloading with the recorded
``quantization_config`` quantizes the LiSA low-rank layers too). :func:`merge_dequantized` dequantizes the base
weights into a float dtype first (transformers' ``PreTrainedModel.dequantize``), then merges: the result is an
ordinary merged LiSA model in that dtype that saves and reloads without bitsandbytes. The alternative is to reload the
base model in bfloat16 / float32 (no quantization) and merge there (``peft-lisa merge``); that merges onto the
original full-precision weights, whereas :func:`merge_dequantized` keeps the NF4-rounded weights the adapter was
trained with.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("peft_lisa")


def merge_dequantized(peft_model: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Dequantize the 4-bit (or 8-bit) base of ``peft_model`` into ``dtype``, then ``merge_and_unload()``.

    Args:
        peft_model: a ``PeftModel`` with one LiSA adapter on a bitsandbytes-quantized base (in place: the model is
            consumed, as by ``merge_and_unload``).
        dtype: the dtype of the merged model's weights (base and LiSA modules). ``torch.float32`` reproduces the
            adapter on the 4-bit base (with float32 compute) to float rounding; ``torch.bfloat16`` halves the size
            at bf16 precision.

    Returns:
        The merged LiSA model (``model_type`` ``lisa_<base>``, no ``quantization_config``); ``save_pretrained`` it and
        reload it with ``AutoModelForCausalLM.from_pretrained`` after ``import peft_lisa``.
    """
    base = peft_model.get_base_model()
    if getattr(base, "hf_quantizer", None) is None:
        raise ValueError(
            "merge_dequantized() is for adapters on a quantized base model; this base is not quantized: use "
            "peft_model.merge_and_unload()."
        )
    logger.info(f"dequantizing the base model to {dtype}")
    base.dequantize(dtype=dtype)  # replaces every bitsandbytes Linear with an nn.Linear in dtype
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(base, flag, False):
            setattr(base, flag, False)
    base.hf_quantizer = None
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    for name, param in peft_model.named_parameters():
        if "lisa_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)
    merged = peft_model.merge_and_unload()
    # Embeddings, norms and the LM head were not quantized: cast them too (parameters only, so that buffers such as
    # the rotary inverse frequencies keep float32, as in a model loaded in ``dtype``).
    for param in merged.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    merged.config.dtype = dtype
    return merged.train(peft_model.training)  # the merged attention modules are new: give them the model's mode
