"""``LiSAModel``: the PEFT tuner that injects LiSA into a causal LM, and turns it into a compact model on merge."""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .architectures import (
    SUPPORTED_ATTENTION,
    attention_of,
    base_layout,
    check_model_supported,
    decoder_layers,
    sharing_refusal,
)
from .carrier import LogitsCarrier
from .config import LISA_FORMAT_VERSION, LiSAConfig, validate_share_layers
from .functional import AttentionLayout
from .layer import ROLE_SHARED, ROLE_SOURCE, LiSALayer, check_rank_fits
from .merged import asks_attention_weights, attention_weights_refusal, foldable_lm_head_input, merge_lisa_adapter

# A checkpoint key of adapter format 1: the three LiSA modules sat in ModuleDicts of their own, and the FFN of the
# alignment was saved with the adapter's name inside its keys (``lisa_align.default.up.weight``).
_FORMAT_1_KEY = re.compile(r"lisa_(?P<module>align|q_lowrank|k_lowrank)\.(?:[^.]+\.(?=(?:up|down)\.))?(?P<rest>.+)$")


class LiSAModel(BaseTuner):
    """Wraps the self-attention of the shared layers (and of the full layers feeding them) with :class:`LiSALayer`.

    Create it through ``peft.get_peft_model(model, LiSAConfig(...))`` after ``import peft_lisa``. Only the LiSA
    modules train; the base model stays frozen and untouched: ``disable_adapter()`` and ``unload()`` give it back
    exactly, and ``merge_and_unload()`` returns a compact model whose shared layers have no ``q_proj``/``k_proj``.
    """

    prefix: str = "lisa_"
    tuner_layer_cls = LiSALayer
    # Every supported decoder wraps ``self_attn`` (support is decided by structure, see architectures.py); the
    # tested families are listed for peft's lookups.
    target_module_mapping = {model_type: ["self_attn"] for model_type in SUPPORTED_ATTENTION}
    # The logits carrier is shared by all wrapped layers of the model.
    uses_shared_state = True

    def _pre_injection_hook(self, model: nn.Module, config: LiSAConfig, adapter_name: str) -> None:
        if not hasattr(self, "logits_carrier"):
            self.logits_carrier = LogitsCarrier()

    def _prepare_model(self, peft_config: LiSAConfig, model: nn.Module) -> None:
        # Runs for every adapter (get_peft_model, add_adapter, load_adapter) before the first module is replaced, so
        # a bad config leaves the model untouched.
        validate_config_for_model(peft_config, model)
        # In memory every adapter is in the current format (older files are converted on load, see below).
        peft_config.lisa_format_version = LISA_FORMAT_VERSION
        peft_config.target_modules = ["self_attn"]
        peft_config.layers_pattern = "layers"
        peft_config.layers_to_transform = peft_config.wrapped_layers

    def _prepare_adapter_config(self, peft_config: LiSAConfig, model_config: dict) -> LiSAConfig:
        return peft_config

    def _create_and_replace(
        self,
        peft_config: LiSAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        layer_idx = target.layer_idx
        role = ROLE_SHARED if layer_idx in peft_config.share_layers else ROLE_SOURCE
        if isinstance(target, LiSALayer):
            target.update_layer(adapter_name, role, peft_config)
            return
        new_module = LiSALayer(target, self.logits_carrier)
        new_module.update_layer(adapter_name, role, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.set_adapter(self.active_adapters)  # a new adapter is added inactive, as in peft
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``...self_attn.lisa_substitute.<adapter>.align.permute`` is saved as ``...lisa_substitute.align.permute``:
        the adapter name sits right after ``lisa_substitute``, above the substitute's own submodules."""
        return key.replace(f".lisa_substitute.{adapter_name}.", ".lisa_substitute.", 1)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LiSAConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Read adapter files of format 1 too: their ``self_attn.lisa_align.permute`` is ``self_attn.lisa_substitute
        .align.permute`` now (likewise ``lisa_q_lowrank``/``lisa_k_lowrank``), and the bias b2 of their linear
        alignment is dropped: softmax removed it, so it never changed an output (see ``HeadAlign``)."""
        converted = {}
        for key, value in state_dict.items():
            match = _FORMAT_1_KEY.search(key)
            if match is None:
                converted[key] = value
            elif not (match["module"] == "align" and match["rest"] == "out_bias" and config.align_hidden == 0):
                converted[key[: match.start()] + f"lisa_substitute.{match['module']}.{match['rest']}"] = value
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, converted)

    def _post_injection_hook(self, model: nn.Module, config: LiSAConfig, adapter_name: str) -> None:
        # A pre-hook on the wrapped transformers model, not ``forward`` of this tuner: a plain ``PeftModel`` and
        # ``generate`` call the transformers model directly.
        if getattr(self, "_forward_pre_hook", None) is None:
            self._forward_pre_hook = model.register_forward_pre_hook(self._before_model_forward, with_kwargs=True)
            # The frozen base's LM head gets an input it multiplies in one product (``foldable_lm_head_input``).
            lm_head = model.get_output_embeddings()
            if isinstance(lm_head, nn.Module):
                self._lm_head_pre_hook = lm_head.register_forward_pre_hook(foldable_lm_head_input)

    def _before_model_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if model.training and torch.is_grad_enabled():
            check_gradient_checkpointing(model)
        if asks_attention_weights(model.config, kwargs) and any(
            isinstance(module, LiSALayer) and not module.disable_adapters for module in model.modules()
        ):
            raise attention_weights_refusal("Ask for them inside `with model.disable_adapter():` (the base's).")
        self.logits_carrier.clear()

    def _remove_forward_pre_hook(self) -> None:
        if getattr(self, "_forward_pre_hook", None) is not None:
            self._forward_pre_hook.remove()
            self._forward_pre_hook = None
        if getattr(self, "_lm_head_pre_hook", None) is not None:
            self._lm_head_pre_hook.remove()
            self._lm_head_pre_hook = None

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(
                f"LiSA adapters replace the attention of their layers, so only one can be active; got {names}."
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise NotImplementedError(
            "LiSA cannot be merged in place: merging removes q_proj/k_proj of the shared layers. "
            "Use model.merge_and_unload(), which returns a compact model."
        )

    def unmerge_adapter(self) -> None:
        raise NotImplementedError("LiSA adapters are never merged in place; there is nothing to unmerge.")

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if not merge:
            self._remove_forward_pre_hook()
            for layer in decoder_layers(self.model):
                if isinstance(layer.self_attn, LiSALayer):
                    layer.self_attn = layer.self_attn.get_base_layer()
            if hasattr(self.model, "peft_config"):
                del self.model.peft_config
            return self.model
        names = adapter_names or self.active_adapters
        if len(names) != 1:
            raise ValueError(
                f"merge_and_unload() merges exactly one LiSA adapter; got {names}. Pass adapter_names=[name]."
            )
        refuse_quantized_merge(self.model)
        merged = merge_lisa_adapter(self.model, self.peft_config[names[0]], names[0])
        self._remove_forward_pre_hook()
        return merged


def refuse_quantized_merge(model: nn.Module) -> None:
    """``merge_and_unload()`` on a 4-/8-bit base would give a model whose saved checkpoint does not reload (reloading
    quantizes the LiSA low-rank layers too): refuse, naming the two ways that work."""
    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_loaded_in_4bit", False):
        return
    raise ValueError(
        "merge_and_unload() on a quantized (bitsandbytes) base model is not supported: its saved model would not "
        "reload. Use peft_lisa.merge_dequantized(peft_model, dtype=torch.bfloat16) (dequantizes the base, then "
        "merges), or reload the base model in bfloat16/float32 without quantization_config, load the adapter onto it "
        "with PeftModel.from_pretrained and merge there (what 'peft-lisa merge' does)."
    )


def validate_config_for_model(config: LiSAConfig, model: nn.Module) -> None:
    """Raise a clear error if ``config`` cannot be applied to ``model``; fills ``config.base_layout``."""
    check_model_supported(model)
    layout = base_layout(model)
    if config.base_layout is not None:
        saved = {k: config.base_layout.get(k) for k in layout}
        if saved != layout:
            diff = {k: (saved[k], layout[k]) for k in layout if saved[k] != layout[k]}
            raise ValueError(
                "This LiSA adapter was created for a different base model: "
                + ", ".join(f"{k} is {new} here but {old} in the adapter" for k, (old, new) in diff.items())
                + ". Load it onto the base model it was trained on (base_model_name_or_path in adapter_config.json)."
            )
    validate_share_layers(config.share_layers, layout["num_hidden_layers"])
    layers = decoder_layers(model)
    for layer_idx in config.share_layers:
        attn_layout = AttentionLayout.from_attention(attention_of(layers[layer_idx]))
        check_rank_fits(attn_layout, config.rank, layer_idx)
        refusal = sharing_refusal(model, layer_idx)
        if refusal is not None:
            raise ValueError(f"LiSA cannot share layer {layer_idx}: {refusal}. Remove {layer_idx} from share_layers.")
    for layer_idx, perm in (config.align_init_permutations or {}).items():
        if len(perm) != layout["num_attention_heads"]:
            raise ValueError(
                f"LiSAConfig.align_init_permutations[{layer_idx}] has {len(perm)} entries, but the model has "
                f"{layout['num_attention_heads']} attention heads."
            )
    config.base_layout = layout


def check_gradient_checkpointing(model: nn.Module) -> None:
    """Refuse reentrant gradient checkpointing: it cannot carry the logits handed between layers."""
    for layer in decoder_layers(model):
        checkpoint_fn = getattr(layer, "_gradient_checkpointing_func", None)
        keywords = getattr(checkpoint_fn, "keywords", {}) or {}
        if getattr(layer, "gradient_checkpointing", False) and keywords.get("use_reentrant", True) is not False:
            raise ValueError(
                "LiSA hands attention logits from layer to layer, which reentrant gradient checkpointing drops. "
                "Enable it with gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default)."
            )
