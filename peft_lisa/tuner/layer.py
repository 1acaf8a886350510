"""``LiSALayer``: the PEFT wrapper of a decoder layer's self-attention (the role peft's ``lora/layer.py`` plays)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .attention import LiSASubstitute, source_attention
from .carrier import LogitsCarrier
from .config import LiSAConfig
from .functional import AttentionLayout, cache_argument, value_projection

ROLE_SHARED = "shared"  # the layer's attention is replaced by LiSA
ROLE_SOURCE = "source"  # a full layer whose logits feed the next (shared) layer


class LiSALayer(nn.Module, BaseTunerLayer):
    """PEFT wrapper of a decoder layer's self-attention module.

    Per adapter, the wrapped layer either *shares* (a :class:`LiSASubstitute` of its own replaces its Q/K) or is a
    *source* (a full layer that attends with the model's own kernel and hands its rotary Q/K to the next, shared,
    layer). With the adapter disabled, or none of the active adapters touching this layer, the base attention runs
    untouched.
    """

    adapter_layer_names = ("lisa_substitute",)
    other_param_names = ("lisa_role",)

    def __init__(self, base_layer: nn.Module, carrier: LogitsCarrier) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx: int = base_layer.layer_idx
        self.layout = AttentionLayout.from_attention(base_layer)
        self.carrier = carrier
        self.lisa_substitute = nn.ModuleDict()
        self.lisa_role: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, role: str, config: LiSAConfig) -> None:
        """Add ``adapter_name`` to this layer with the given role, shaped by the ``LiSAConfig``."""
        self.lisa_role[adapter_name] = role
        if role == ROLE_SHARED:
            substitute = LiSASubstitute(
                self.layout,
                self.base_layer.o_proj.out_features,
                layer_idx=self.layer_idx,
                rank=config.rank,
                align_hidden=config.resolved_align_hidden(self.layout.num_heads),
                align_activation=config.align_activation,
                rotary_frequencies=config.rotary_frequencies,
                hands_on=self.layer_idx + 1 in config.share_layers,
                carrier=self.carrier,
                init_permutation=(config.align_init_permutations or {}).get(self.layer_idx),
                head_mixing=config.head_mixing,
            )
            substitute.reset_lowrank(config.init_lowrank)
            self.lisa_substitute[adapter_name] = substitute
            self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # The base attention has no ``weight``; follow its output projection (a quantized layer keeps a float dtype
        # for its compute, so the adapter stays float32 and is cast by peft's autocast rules).
        reference = next(self.base_layer.o_proj.parameters())
        if adapter_name in self.lisa_substitute:
            self.lisa_substitute[adapter_name].to(device or reference.device)

    def _active_lisa_adapter(self) -> Optional[str]:
        active = [name for name in self.active_adapters if name in self.lisa_role]
        if len(active) > 1:
            raise ValueError(
                f"LiSA adapters {active} are active together, but each one replaces the attention of its layers; "
                "activate one at a time with model.set_adapter(name)."
            )
        return active[0] if active else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        cache = cache_argument(cache, kwargs)
        adapter = None if self.disable_adapters else self._active_lisa_adapter()
        base = self.base_layer
        if adapter is None:
            return base(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
        if self.lisa_role[adapter] == ROLE_SOURCE:  # the base kernel gets the base layer's kwargs
            return source_attention(
                base, self.carrier, hidden_states, position_embeddings, attention_mask, cache, kwargs
            )
        output = self.lisa_substitute[adapter].attend(
            hidden_states,
            position_embeddings,
            attention_mask,
            value_projection(base, self.layout),
            base.o_proj,
            cache=cache,
            cache_kwargs=kwargs,
            dropout=getattr(base, "attention_dropout", 0.0) if self.training else 0.0,
        )
        return output, None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(
            "LiSA changes the structure of the attention (it removes q_proj/k_proj), so it cannot be merged in place. "
            "Use model.merge_and_unload(), which returns a compact model."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("LiSA adapters are never merged in place; there is nothing to unmerge.")

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, roles={self.lisa_role}"


def check_rank_fits(layout: AttentionLayout, rank: int, layer_idx: int) -> None:
    """Raise if ``rank`` does not fit the layer's head size."""
    if rank > layout.head_dim:
        raise ValueError(
            f"LiSAConfig.rank={rank} is larger than the head size {layout.head_dim} of layer {layer_idx}; a low-rank "
            f"query/key must have rank <= head size. Use rank <= {layout.head_dim}."
        )
