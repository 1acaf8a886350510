"""Configuration of the LiSA tuner (``docs/method.md``, "Our design"): one documented dataclass, validated once."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from .layer_choice import choose_layers
from .registration import LISA_PEFT_TYPE

# Bumped when the saved adapter format changes in a way older releases cannot read. Version 2 keeps each shared
# layer's modules in one ``lisa_substitute`` and has no bias b2 in the linear alignment; version 1 files still load.
LISA_FORMAT_VERSION = 2

AlignActivation = Literal["gelu", "silu", "relu", "tanh"]
RotaryFrequencies = Literal["first", "strided"]
HeadMixing = Literal["full", "kv_group"]

# Linear-only head alignment: chosen by measurement (README, "Choosing align_hidden").
DEFAULT_ALIGN_HIDDEN = 0


@dataclass
class LiSAConfig(PeftConfig):
    """Configuration of a LiSA adapter: which layers share attention and how their substitute is shaped.

    A shared layer ``l`` replaces its own ``softmax(Q_l K_l^T)`` by ``softmax(align(S_{l-1}) + Q_r K_r^T)``: the
    previous layer's pre-softmax logits, realigned along the head axis by a tiny FFN, plus a low-rank rotary
    correction. It keeps its own ``v_proj`` and ``o_proj``; its ``q_proj`` and ``k_proj`` become redundant and are
    deleted by ``merge_and_unload()``.

    Args:
        share_layers (`list[int]`):
            Indices of the decoder layers whose self-attention is replaced by LiSA. Layer 0 can never share (it has no
            predecessor). Consecutive shared layers chain: layer ``l`` then receives the reconstructed logits of
            ``l-1``. Use ``peft_lisa.analyze`` to choose them from calibration data.
        rank (`int`):
            Per-head rank ``r`` of the low-rank query/key projections that model the difference between the realigned
            attention and the layer's true attention. Must be even (rotary embeddings rotate pairs of dimensions) and
            at most the model's head size.
        align_hidden (`int`, *optional*):
            Hidden size ``m`` of the head-alignment FFN ``P s + W2 act(W1 s + b1) + b2``. ``0`` (the default) gives a
            linear-only alignment (``P`` alone: a bias would be removed by the softmax); ``None`` means ``4 * H``
            (``H`` query heads), resolved by :meth:`resolved_align_hidden`. The FFN runs
            on every (query, key) entry, about ``4 H m`` FLOPs each: measured on SmolLM2-135M (README, "Choosing
            align_hidden"), ``m = 4H`` learns faster per token but makes the merged model slower (decode 1.06x vs
            1.19x of the base at batch 8 x 2048, prefill 0.23x vs 0.70x at 2048 tokens).
        align_activation (`str`):
            Activation of the head-alignment FFN.
        align_init_permutations (`dict[int, list[int]]`, *optional*):
            Initial head permutation per shared layer: ``perm[i]`` is the head of layer ``l-1`` whose logits head
            ``i`` of layer ``l`` starts from. Layers absent from the dict start from the identity. Typically the
            best matching found by ``peft_lisa.analyze``.
        rotary_frequencies (`str`):
            Which of the model's rotary frequencies the rank-``r`` query/key use. ``"first"`` takes the first
            ``r/2`` (highest) frequencies; ``"strided"`` takes ``r/2`` frequencies evenly spread from the first to the
            last (indices ``round(i (d_h/2 - 1) / (r/2 - 1))``, e.g. 0, 10, 21, 31 for ``d_h = 64``, ``r = 8``), so
            that the whole spectrum, long-range included, is covered. Default ``"strided"``, chosen by measurement
            (``docs/method.md``, "Open choices"); adapters saved with ``"first"`` store it and load unchanged.
        head_mixing (`str`):
            Which heads of layer ``l-1`` the alignment ``P`` may mix into a head of layer ``l``. ``"full"`` (the
            default): all of them. ``"kv_group"``: only the heads of one KV group of layer ``l-1`` (the group most
            of the initial permutation points to), so that ``P`` is block-structured; with multi-query/grouped
            attention a group holds ``H / H_kv`` heads, without it (``H_kv = H``) each head reads one source head,
            scaled. The linear alignment then runs as one fused attention call of head size ``d_h + r`` (``H_kv d_h +
            r`` with ``"full"``): much faster prefills on long inputs, at a measured quality cost
            (``docs/method.md``, "Head mixing"). Only the linear alignment (``align_hidden=0``) takes the fused path.
        init_lowrank (`str`):
            Initialisation of the low-rank delta: ``"zero"`` zero-initialises the query factor so that an untrained
            adapter is exactly direct sharing with the initial permutation; ``"random"`` initialises both factors
            (small), so that gradients reach both from the first step.
        target_modules (`list[str]` or `str`, *optional*):
            Name of the self-attention modules of the decoder layers (``"self_attn"`` for every supported
            architecture). Filled in automatically.
        layers_to_transform (`list[int]`, *optional*):
            The decoder layers whose attention module gets wrapped: the shared layers and the full layers that feed
            them logits. Derived from ``share_layers`` and written into the saved config; do not set it yourself.
        layers_pattern (`str`, *optional*):
            Name of the decoder layer list (``"layers"``). Filled in automatically.
        modules_to_save (`list[str]`, *optional*):
            Extra modules to train fully and save with the adapter (standard PEFT field).
        trainable_token_indices (`list[int]` or `dict`, *optional*):
            Token indices of the embedding to train (standard PEFT field); not used by LiSA itself.
        base_layout (`dict`, *optional*):
            Layer/head layout of the base model the adapter was created for (number of layers, heads, KV heads, head
            size, model type). Filled in at creation and checked on load so that an adapter is never applied to a
            base model of another shape.
        lisa_format_version (`int`):
            Version of the saved LiSA adapter format.
    """

    share_layers: list[int] = field(
        default_factory=list,
        metadata={"help": "Indices of the decoder layers whose self-attention is replaced by LiSA (never layer 0)."},
    )
    rank: int = field(default=8, metadata={"help": "Per-head rank of the low-rank rotary query/key delta (even)."})
    align_hidden: Optional[int] = field(
        default=DEFAULT_ALIGN_HIDDEN,
        metadata={
            "help": "Hidden size of the head-alignment FFN; 0 (default) = linear-only alignment, None = 4 * num_heads."
        },
    )
    align_activation: AlignActivation = field(
        default="gelu", metadata={"help": "Activation of the head-alignment FFN: gelu, silu, relu or tanh."}
    )
    align_init_permutations: Optional[dict[int, list[int]]] = field(
        default=None,
        metadata={
            "help": "Initial head permutation per shared layer (perm[i] = source head of head i); identity if absent."
        },
    )
    rotary_frequencies: RotaryFrequencies = field(
        default="strided",
        metadata={"help": "Rotary frequencies of the rank-r query/key: 'first' (highest) or 'strided' (spread)."},
    )
    head_mixing: HeadMixing = field(
        default="full",
        metadata={"help": "Source heads P may mix: 'full' (all) or 'kv_group' (one KV group: faster prefill)."},
    )
    init_lowrank: Literal["zero", "random"] = field(
        default="zero",
        metadata={
            "help": "'zero': the query factor starts at zero (untrained = direct sharing); 'random': both small."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the self-attention modules ('self_attn'); filled in automatically."},
    )
    layers_to_transform: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Wrapped decoder layers (shared + their sources); derived from share_layers, do not set."},
    )
    layers_pattern: Optional[str] = field(
        default=None, metadata={"help": "Name of the decoder layer list ('layers'); filled in automatically."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save with the adapter (standard PEFT)."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Embedding token indices to train (standard PEFT); not used by LiSA itself."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never to wrap (standard PEFT field); LiSA ignores it."}
    )
    base_layout: Optional[dict] = field(
        default=None,
        metadata={"help": "Layer/head layout of the base model, filled in at creation and checked on load."},
    )
    lisa_format_version: int = field(
        default=LISA_FORMAT_VERSION, metadata={"help": "Version of the saved LiSA adapter format."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LISA_PEFT_TYPE
        if self.lisa_format_version > LISA_FORMAT_VERSION:
            raise ValueError(
                f"This LiSA adapter was saved in format version {self.lisa_format_version}, but the installed "
                f"peft_lisa reads versions up to {LISA_FORMAT_VERSION}. Upgrade peft_lisa (pip install -U peft-lisa)."
            )
        self.share_layers = validate_share_layers(self.share_layers)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 2 or self.rank % 2:
            raise ValueError(
                f"LiSAConfig.rank must be an even integer >= 2 (rotary embeddings rotate pairs of dimensions), "
                f"got {self.rank!r}."
            )
        if self.align_hidden is not None and (
            isinstance(self.align_hidden, bool) or not isinstance(self.align_hidden, int) or self.align_hidden < 0
        ):
            raise ValueError(f"LiSAConfig.align_hidden must be None or an integer >= 0, got {self.align_hidden!r}.")
        for name, allowed in (
            ("align_activation", AlignActivation.__args__),
            ("rotary_frequencies", RotaryFrequencies.__args__),
            ("head_mixing", HeadMixing.__args__),
            ("init_lowrank", ("zero", "random")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LiSAConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        self.align_init_permutations = self._validated_permutations(self.align_init_permutations)

    def _validated_permutations(self, permutations: object) -> Optional[dict[int, list[int]]]:
        if permutations is None:
            return None
        if not isinstance(permutations, dict):
            raise ValueError(
                f"LiSAConfig.align_init_permutations must be a dict {{layer: permutation}}, got {type(permutations)}."
            )
        validated: dict[int, list[int]] = {}
        for layer, perm in permutations.items():
            layer_idx = int(layer)  # JSON turns the int keys into strings
            if layer_idx not in self.share_layers:
                raise ValueError(
                    f"LiSAConfig.align_init_permutations has an entry for layer {layer_idx}, which is not in "
                    f"share_layers {self.share_layers}."
                )
            perm = [int(h) for h in perm]
            if sorted(perm) != list(range(len(perm))):
                raise ValueError(
                    f"LiSAConfig.align_init_permutations[{layer_idx}] = {perm} is not a permutation of "
                    f"0..{len(perm) - 1}."
                )
            validated[layer_idx] = perm
        return dict(sorted(validated.items()))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """Load the config of a saved LiSA adapter (a local directory or a hub id).

        For a local adapter directory this also checks, before any model is touched, that
        ``adapter_model.safetensors`` is present, readable and holds the weights of every shared layer; pass
        ``check_weights=False`` to read a directory holding only ``adapter_config.json``.
        """
        check_weights = kwargs.pop("check_weights", True)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if check_weights and os.path.isdir(directory):
            check_adapter_weights_file(directory, config)
        return config

    @property
    def source_layers(self) -> list[int]:
        """Full (unshared) layers whose logits feed a shared layer."""
        shared = set(self.share_layers)
        return sorted({i - 1 for i in shared} - shared)

    @property
    def wrapped_layers(self) -> list[int]:
        """All layers whose attention module the adapter wraps: shared layers and their full sources."""
        return sorted(set(self.share_layers) | set(self.source_layers))

    def resolved_align_hidden(self, num_heads: int) -> int:
        """The alignment FFN's hidden size ``m`` for a model with ``num_heads`` query heads (``None`` -> ``4 H``)."""
        return 4 * num_heads if self.align_hidden is None else self.align_hidden

    @classmethod
    def from_analysis(
        cls,
        analysis: Any,
        *,
        fraction: Optional[float] = None,
        threshold: Optional[float] = None,
        keep_first: int = 2,
        score: str = "js_matched",
        max_chain: Optional[int] = None,
        **kwargs: Any,
    ) -> LiSAConfig:
        """A config whose shared layers and initial head permutations come from a calibration analysis.

        ``share_layers`` is chosen by the rule of ``docs/method.md``, "Layer choice" (:func:`choose_layers`: the
        layers ``>= keep_first`` with the lowest ``score``, the best ``round(fraction * num_layers)`` and/or those at
        most ``threshold``), and ``align_init_permutations`` takes the analysis' best head permutation of each
        chosen layer (step 2). Both are explicit fields, so the saved ``adapter_config.json`` holds the
        chosen layers and permutations.

        Args:
            analysis: a ``peft_lisa.analysis.AttentionAnalysis`` or the path of its JSON.
            fraction, threshold, keep_first, score, max_chain: see
                :func:`~peft_lisa.tuner.layer_choice.choose_layers`.
            **kwargs: any other ``LiSAConfig`` field (``rank``, ``align_hidden``, ...).
        """
        conflicting = sorted({"share_layers", "align_init_permutations"} & set(kwargs))
        if conflicting:
            raise ValueError(
                f"LiSAConfig.from_analysis chooses {' and '.join(conflicting)} itself; use LiSAConfig(...) directly "
                "to set them by hand."
            )
        data = analysis_data(analysis)
        layers = choose_layers(
            data.get(score) if score in data else None,
            data["num_layers"],
            fraction=fraction,
            threshold=threshold,
            keep_first=keep_first,
            score=score,
            max_chain=max_chain,
        )
        permutations = {layer: list(data["permutations"][layer]) for layer in layers if data["permutations"][layer]}
        return cls(share_layers=layers, align_init_permutations=permutations or None, **kwargs)


def analysis_data(analysis: Any) -> Mapping[str, Any]:
    """The per-layer fields of an attention analysis: its ``to_dict()``, or the JSON file it was saved to."""
    if hasattr(analysis, "to_dict"):
        return analysis.to_dict()
    try:
        data = json.loads(Path(analysis).read_text(encoding="utf-8"))
    except (OSError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"LiSAConfig.from_analysis needs a peft_lisa.AttentionAnalysis or the path of its JSON; could not read "
            f"{analysis!r} ({error})."
        ) from error
    missing = [key for key in ("num_layers", "permutations") if key not in data]
    if missing:
        raise ValueError(f"{analysis} is not a LiSA attention analysis: missing keys {missing}.")
    return data


def validate_share_layers(layers: object, num_layers: Optional[int] = None) -> list[int]:
    """The one check of ``share_layers``: a non-empty list of distinct layer indices >= 1 (and < ``num_layers`` when
    given). Returns them sorted; raises ``ValueError`` naming the problem and the fix."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if (
        not isinstance(layers, Sequence)
        or isinstance(layers, str)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise ValueError(f"LiSAConfig.share_layers must be a list of layer indices (ints), got {layers!r}.")
    if not layers:
        raise ValueError(
            "LiSAConfig.share_layers is empty: name the decoder layers that should share attention, e.g. "
            "share_layers=[4, 5, 6, 7], or choose them with peft_lisa.choose_share_layers(analysis, ...)."
        )
    duplicates = sorted({i for i in layers if list(layers).count(i) > 1})
    if duplicates:
        raise ValueError(f"LiSAConfig.share_layers lists layers {duplicates} more than once.")
    if any(i <= 0 for i in layers):
        raise ValueError(
            f"LiSAConfig.share_layers contains {sorted(i for i in layers if i <= 0)}: layer 0 can never share "
            "(it has no previous layer to take attention from) and indices must be positive."
        )
    out_of_range = sorted(i for i in layers if num_layers is not None and i >= num_layers)
    if out_of_range:
        raise ValueError(
            f"LiSAConfig.share_layers contains {out_of_range}, but the model has {num_layers} layers: "
            f"valid indices are 1..{num_layers - 1}."
        )
    return sorted(layers)


def check_adapter_weights_file(directory: str, config: LiSAConfig) -> None:
    """Raise a clear error if a local adapter directory lacks a readable weights file with every shared layer."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The LiSA adapter directory {directory!r} has adapter_config.json but no {SAFETENSORS_WEIGHTS_NAME}: it "
            "is incomplete (an interrupted save or copy?). Save the adapter again with model.save_pretrained(...)."
        )
    try:
        with safe_open(path, framework="pt") as weights:
            keys = list(weights.keys())
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"The LiSA adapter weights {path!r} are corrupt or truncated ({exc}). Save or download the adapter again."
        ) from exc
    # Format 2 keeps a shared layer's modules under ``lisa_substitute``, format 1 under ``lisa_align`` & co.
    missing = [
        layer
        for layer in config.share_layers
        if not any(
            f"layers.{layer}.self_attn.lisa_substitute." in key or f"layers.{layer}.self_attn.lisa_align" in key
            for key in keys
        )
    ]
    if missing:
        raise ValueError(
            f"The LiSA adapter weights {path!r} hold no weights for shared layers {missing} listed in "
            "adapter_config.json: the file does not belong to this config. Save the adapter again."
        )
