"""Calibration analysis: how similar is each layer's attention to its predecessor's, and which layers can share.

METHOD.md part (a): in trained LLMs the attention weights of adjacent layers are similar for most layers, measured
as the Jensen-Shannon divergence (JS) between attention distributions; heads are not aligned by index, and shallow
layers are fragile. METHOD.md part (b), "Layer choice": ``share_layers`` can be chosen automatically from such an
analysis, keeping the first layers full, and the best head permutation initialises ``P`` of the head alignment
(step 2).

:func:`analyze` measures, on calibration text:

* for every layer ``l >= 1`` an ``H x H`` matrix ``JS[l][i, j]``: the divergence between the attention of head ``i``
  of layer ``l`` and head ``j`` of layer ``l-1``, averaged over query rows (each row, i.e. the attention of one query
  over its causal keys, is one distribution), sequences and batches;
* ``js_indexed[l]``, the mean of its diagonal (head ``i`` shares from head ``i``, "direct sharing");
* ``permutations[l]`` and ``js_matched[l]``, the best one-to-one head matching (optimal assignment,
  ``scipy.optimize.linear_sum_assignment``) and its mean divergence. ``permutations[l][i]`` is the head of layer
  ``l-1`` that head ``i`` of layer ``l`` starts from, the convention of ``LiSAConfig.align_init_permutations``;
* an ``L x L`` matrix of best-matched JS between every pair of layers (for the heatmap);
* optionally the *sensitivity* of every layer: how much the LM loss rises when only that layer shares directly (an
  untrained LiSA adapter on that layer alone), with the identity and with the best permutation.

GQA: the matching is unconstrained on purpose. LiSA aligns the per-*query*-head logits of layer ``l-1``; a shared
layer keeps its own values and its own (low-rank) keys per KV group, so any head of layer ``l-1`` can feed any head
of layer ``l`` whatever their KV groups. As a diagnostic, ``js_matched_grouped`` reports the best matching that keeps
KV groups together (all query heads of one KV group of layer ``l`` come from a single KV group of layer ``l-1``):
the permutations a head-permuted copy of layer ``l-1``'s Q/K weights would produce. For MHA models both coincide.

Divergences are in bits (log base 2), so they lie in ``[0, 1]``. Attention probabilities are computed from the
model's own query/key projections (rotary, ``q_norm``/``k_norm``) by hooks, whatever the model's attention
implementation, and the model is never modified: the sensitivity pass wraps and unwraps it with ``unload()`` and
restores its ``requires_grad`` flags and train/eval mode.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .resources import chunk_token_ids
from .tuner.architectures import (
    attention_of,
    check_model_supported,
    decoder_layers,
    layer_attention_type,
)
from .tuner.config import LiSAConfig
from .tuner.functional import additive_mask, grouped_scores, permutation_matrix, project_full_qkv
from .tuner.layer import LiSALayer
from .tuner.layer_choice import choose_layers

ANALYSIS_FORMAT_VERSION = 1
_LN2 = math.log(2.0)
_SIGNIFICANT_DIGITS = 6  # stored values are rounded: far below the sampling noise, and a readable JSON


# --------------------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionAnalysis:
    """Result of :func:`analyze`; serialisable to JSON (:meth:`to_json` / :meth:`from_json`) and plottable.

    Per-layer lists have one entry per decoder layer, indexed by layer; entry 0 is ``None`` (layer 0 has no
    predecessor and can never share). All divergences are Jensen-Shannon divergences in bits (``[0, 1]``);
    sensitivities are rises of the mean LM loss in nats per token.

    Attributes:
        model_name: ``config._name_or_path`` of the analysed model (or its model type).
        num_layers, num_heads, num_kv_heads: layout of the model.
        seq_len: tokens per calibration sequence.
        num_sequences: calibration sequences used for the divergences.
        num_tokens: tokens in those sequences (``num_sequences * seq_len``).
        query_rows: query positions per sequence whose attention rows enter the per-layer divergences (the middles
            of equal strata of positions ``1..seq_len-1``; position 0 attends only to itself and is skipped).
        matrix_rows: query positions per sequence (a subset of those) used for ``js_layers``.
        js_indexed: mean JS between head ``i`` of layer ``l`` and head ``i`` of layer ``l-1``.
        js_matched: mean JS after the best head matching.
        js_matched_grouped: mean JS of the best matching that keeps KV groups together (see the module docstring).
        permutations: best matching per layer; ``permutations[l][i]`` = head of layer ``l-1`` for head ``i`` of
            layer ``l`` (the convention of ``LiSAConfig.align_init_permutations``).
        js_heads: the ``H x H`` matrices ``JS[l][i, j]`` (head ``i`` of layer ``l`` vs head ``j`` of ``l-1``).
        js_layers: ``L x L`` symmetric matrix of best-matched mean JS between every pair of layers (zero diagonal),
            from the ``matrix_rows`` subset of query rows, so its first off-diagonal is close to, not equal to,
            ``js_matched``.
        sensitivity_direct: rise of the LM loss when only layer ``l`` shares directly (identity permutation,
            untrained LiSA); ``None`` if not measured.
        sensitivity_permuted: the same with ``permutations[l]`` as initial alignment.
        base_loss: LM loss of the unmodified model on the sensitivity batch.
        sensitivity_tokens: tokens in the sensitivity batch.
        format_version: version of this format.
    """

    model_name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    seq_len: int
    num_sequences: int
    num_tokens: int
    query_rows: int
    matrix_rows: int
    js_indexed: list[Optional[float]]
    js_matched: list[Optional[float]]
    js_matched_grouped: list[Optional[float]]
    permutations: list[Optional[list[int]]]
    js_heads: list[Optional[list[list[float]]]]
    js_layers: list[list[float]]
    sensitivity_direct: Optional[list[Optional[float]]] = None
    sensitivity_permuted: Optional[list[Optional[float]]] = None
    base_loss: Optional[float] = None
    sensitivity_tokens: int = 0
    format_version: int = field(default=ANALYSIS_FORMAT_VERSION)

    # ---- serialisation ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) form of the analysis."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionAnalysis:
        """Rebuild an analysis from :meth:`to_dict` output (unknown keys are ignored)."""
        if not isinstance(data, dict):
            raise ValueError(f"A LiSA attention analysis is a JSON object, got {type(data).__name__}.")
        version = data.get("format_version", ANALYSIS_FORMAT_VERSION)
        if version > ANALYSIS_FORMAT_VERSION:
            raise ValueError(
                f"This attention analysis has format version {version}; the installed peft_lisa reads versions up "
                f"to {ANALYSIS_FORMAT_VERSION}. Upgrade peft_lisa."
            )
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"Not a LiSA attention analysis: missing keys {missing}.")
        return cls(**{key: value for key, value in data.items() if key in names})

    def to_json(self, path: Union[str, os.PathLike]) -> str:
        """Write the analysis as JSON (one top-level key per line) and return the path."""
        data = self.to_dict()
        body = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value, allow_nan=False)}" for key, value in data.items())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{\n" + body + "\n}\n", encoding="utf-8")
        return str(path)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> AttentionAnalysis:
        """Read an analysis written by :meth:`to_json`; ``from_json(p) == analysis`` after ``to_json(p)``."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error.msg}); expected a LiSA attention analysis.") from error
        return cls.from_dict(data)

    # ---- reporting -------------------------------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        """Short model name for titles: the last component of a local path, else the name as given."""
        name = self.model_name.rstrip("/\\")
        return os.path.basename(name) if os.path.isabs(name) else name

    def summary_table(self) -> str:
        """A markdown table: one row per layer with divergences, best permutation and sensitivities."""
        header = ["layer", "JS indexed", "JS matched", "JS matched (KV groups kept)", "best permutation"]
        if self.sensitivity_direct is not None:
            header += ["loss rise, direct", "loss rise, permuted"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

        def fmt(values: Optional[Sequence[Optional[float]]], layer: int) -> str:
            value = None if values is None else values[layer]
            return "-" if value is None else f"{value:.4f}"

        for layer in range(self.num_layers):
            perm = self.permutations[layer]
            if perm is None:
                perm_text = "-"
            elif perm == list(range(len(perm))):
                perm_text = "identity"
            else:
                perm_text = " ".join(str(h) for h in perm)
            cells = [
                str(layer),
                fmt(self.js_indexed, layer),
                fmt(self.js_matched, layer),
                fmt(self.js_matched_grouped, layer),
                perm_text,
            ]
            if self.sensitivity_direct is not None:
                cells += [fmt(self.sensitivity_direct, layer), fmt(self.sensitivity_permuted, layer)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot_heatmap(self, path: Union[str, os.PathLike]) -> str:
        """Save a PNG heatmap of the layer-by-layer best-matched JS matrix (``js_layers``); returns the path."""
        from matplotlib.figure import Figure

        size = min(10.0, 3.0 + 0.22 * self.num_layers)
        fig = Figure(figsize=(size + 1.2, size))
        ax = fig.add_subplot()
        image = ax.imshow(np.asarray(self.js_layers, dtype=float), cmap="viridis", origin="upper")
        colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        colorbar.set_label("best-matched JS divergence (bits)")
        step = max(1, math.ceil(self.num_layers / 16))
        ticks = list(range(0, self.num_layers, step))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(
            f"{self.display_name}: attention divergence between layers\n"
            f"(heads optimally matched; {self.num_sequences} x {self.seq_len} tokens)",
            fontsize=10,
        )
        return _save(fig, path)

    def plot_layers(self, path: Union[str, os.PathLike]) -> str:
        """Save a PNG bar chart per layer: indexed vs matched JS to the previous layer, and (if measured) the
        loss rise when only that layer shares; returns the path."""
        from matplotlib.figure import Figure

        layers = np.arange(self.num_layers)
        has_sensitivity = self.sensitivity_direct is not None
        width_in = min(16.0, 4.0 + 0.35 * self.num_layers)
        fig = Figure(figsize=(width_in, 7.0 if has_sensitivity else 4.0))
        axes = fig.subplots(2 if has_sensitivity else 1, 1, sharex=True, squeeze=False)[:, 0]
        bar = 0.4
        top = axes[0]
        top.bar(layers - bar / 2, _nan(self.js_indexed), bar, label="head i <- head i (indexed)", color="tab:gray")
        top.bar(layers + bar / 2, _nan(self.js_matched), bar, label="best head matching", color="tab:blue")
        top.set_ylabel("JS to layer l-1 (bits)")
        top.set_title(
            f"mean over {self.num_sequences} x {self.seq_len} tokens, {self.query_rows} query rows each", fontsize=9
        )
        top.legend(fontsize=8, loc="upper right")
        top.grid(axis="y", alpha=0.3)
        if has_sensitivity:
            bottom = axes[1]
            bottom.bar(
                layers - bar / 2, _nan(self.sensitivity_direct), bar, label="direct (identity)", color="tab:red"
            )
            if self.sensitivity_permuted is not None:
                bottom.bar(
                    layers + bar / 2,
                    _nan(self.sensitivity_permuted),
                    bar,
                    label="best permutation",
                    color="tab:orange",
                )
            if self.base_loss is not None:
                bottom.set_title(
                    f"untrained LiSA on layer l alone; {self.sensitivity_tokens} tokens, "
                    f"base loss {self.base_loss:.3f}",
                    fontsize=9,
                )
            bottom.set_yscale("symlog", linthresh=0.01)
            bottom.set_ylabel("loss rise when only\nlayer l shares (nats)")
            bottom.legend(fontsize=8, loc="upper right")
            bottom.grid(axis="y", alpha=0.3)
        axes[-1].set_xlabel("layer l")
        axes[-1].set_xticks(layers)
        axes[-1].tick_params(axis="x", labelsize=8)
        axes[-1].set_xlim(-0.7, self.num_layers - 0.3)
        fig.suptitle(
            f"{self.display_name}: attention similarity to the previous layer and sharing sensitivity",
            fontsize=11,
        )
        return _save(fig, path)


def _nan(values: Sequence[Optional[float]]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _save(fig: Any, path: Union[str, os.PathLike]) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path)


def _round(value: float) -> Optional[float]:
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{_SIGNIFICANT_DIGITS}g}")


# --------------------------------------------------------------------------------------------------------------
# Jensen-Shannon divergence and head matching
# --------------------------------------------------------------------------------------------------------------


def _neg_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``sum_k p log p`` over the last axis (0 log 0 = 0)."""
    return torch.special.xlogy(probs, probs).sum(-1)


def js_divergence_matrix(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pairwise JS divergences (bits) between the distributions of two sets of heads, row by row.

    ``p``: N x H1 x K and ``q``: N x H2 x K hold N distributions (over K keys) per head; returns N x H1 x H2.
    Uses ``JS = H(m) - (H(p) + H(q)) / 2`` with ``m = (p + q) / 2``; since ``sum(p + q) = 2``,
    ``JS = 1 - (n(p + q) - n(p) - n(q)) / (2 ln 2)`` bits with ``n(x) = sum x log x``.
    """
    p, q = p.float(), q.float()
    both = p[:, :, None, :] + q[:, None, :, :]  # N x H1 x H2 x K
    cross = both.xlogy_(both).sum(-1)
    js = 1.0 - (cross - _neg_entropy(p)[:, :, None] - _neg_entropy(q)[:, None, :]) / (2.0 * _LN2)
    return js.clamp_(0.0, 1.0)


def _js_sum(current: torch.Tensor, previous: torch.Tensor, positions: Sequence[int], chunk: int = 16) -> torch.Tensor:
    """Sum over batch and query rows of the H x H JS matrix between two layers' attention rows.

    ``current``/``previous``: B x H x R x T attention rows at the query ``positions`` (ascending). Rows are processed
    in chunks whose keys are cut after the last position of the chunk: keys beyond a query are masked (zero) in both
    distributions and add nothing, so this is exact and saves work.
    """
    batch, num_heads, rows, _ = current.shape
    total = torch.zeros(num_heads, previous.shape[1], dtype=torch.float64)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        keys = positions[stop - 1] + 1
        a = current[:, :, start:stop, :keys].permute(0, 2, 1, 3).reshape(-1, num_heads, keys)
        b = previous[:, :, start:stop, :keys].permute(0, 2, 1, 3).reshape(-1, previous.shape[1], keys)
        total += js_divergence_matrix(a, b).sum(0).double().cpu()
    return total


def best_head_matching(js: np.ndarray) -> tuple[list[int], float]:
    """Optimal one-to-one matching of the heads of layer ``l`` (rows) to those of layer ``l-1`` (columns).

    Returns ``(perm, mean JS of the matched pairs)`` with ``perm[i]`` the head of layer ``l-1`` for head ``i``.
    """
    from scipy.optimize import linear_sum_assignment

    js = np.asarray(js, dtype=float)
    rows, cols = linear_sum_assignment(js)
    perm = [int(c) for _, c in sorted(zip(rows, cols, strict=True))]
    return perm, float(js[np.arange(len(perm)), perm].mean())


def best_grouped_matching(js: np.ndarray, num_kv_heads: int) -> tuple[list[int], float]:
    """Best matching that keeps KV groups together: every query head of KV group ``g`` of layer ``l`` takes a head
    of one and the same KV group of layer ``l-1``, groups matched one to one (GQA; see the module docstring).

    Optimal: once the group assignment is fixed, the matchings inside the group blocks are independent, so the
    group assignment is itself an assignment problem over the optimal block costs.
    """
    from scipy.optimize import linear_sum_assignment

    js = np.asarray(js, dtype=float)
    num_heads = js.shape[0]
    group = num_heads // num_kv_heads
    block_cost = np.zeros((num_kv_heads, num_kv_heads))
    inner: dict[tuple[int, int], np.ndarray] = {}
    for g in range(num_kv_heads):
        for s in range(num_kv_heads):
            block = js[g * group : (g + 1) * group, s * group : (s + 1) * group]
            rows, cols = linear_sum_assignment(block)
            block_cost[g, s] = block[rows, cols].sum()
            inner[g, s] = cols[np.argsort(rows)]
    group_rows, group_cols = linear_sum_assignment(block_cost)
    source_group = dict(zip(group_rows.tolist(), group_cols.tolist(), strict=True))
    perm = [
        source_group[i // group] * group + int(inner[i // group, source_group[i // group]][i % group])
        for i in range(num_heads)
    ]
    return perm, float(js[np.arange(num_heads), perm].mean())


# --------------------------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------------------------


def _spread(total: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``range(total)``, both ends included (all when ``count >= total``)."""
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def _strata(total: int, count: int) -> list[int]:
    """The middle index of each of ``count`` equal strata of ``range(total)`` (all when ``count >= total``).

    A mean over these indices estimates the mean over all of them without over-weighting the ends (query row 1, with
    its two keys, has a near-zero divergence and would weigh ``1/count`` instead of ``1/total`` as an end point).
    """
    if count >= total:
        return list(range(total))
    return sorted({int((i + 0.5) * total / count) for i in range(count)})


def calibration_blocks(
    tokenizer: Any, texts: Union[str, Sequence[str]], seq_len: int, max_blocks: int
) -> torch.Tensor:
    """Token blocks for the analysis: ``[N, seq_len]`` with ``N <= max_blocks``.

    Empty and whitespace-only texts (and ``None``) are skipped; the others are joined with EOS by
    :func:`peft_lisa.resources.chunk_token_ids`, so very short texts simply join the stream. When the stream gives
    more than ``max_blocks`` blocks, blocks evenly spread over it are taken, so the calibration covers the whole text
    collection rather than its first documents. Raises ``ValueError`` if no full block remains.
    """
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a query needs a previous key), got {seq_len!r}.")
    usable = [text for text in texts if isinstance(text, str) and text.strip()]
    if not usable:
        raise ValueError(
            f"No usable calibration text: all {len(texts)} texts are empty or whitespace. Pass documents, e.g. "
            "peft_lisa.resources.load_texts(split='train')."
        )
    try:
        blocks = chunk_token_ids(tokenizer, usable, seq_len)
    except ValueError as error:
        raise ValueError(
            f"The calibration texts are too short for one block of seq_len={seq_len} tokens ({error}). Pass more or "
            "longer texts, or a smaller seq_len."
        ) from error
    return blocks[_spread(len(blocks), max_blocks)]


# --------------------------------------------------------------------------------------------------------------
# Attention rows by hooks
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _attention_row_hooks(model: nn.Module, positions: torch.Tensor, store: dict[int, torch.Tensor]) -> Iterator[None]:
    """While active, every forward pass stores in ``store[l]`` the attention probabilities of layer ``l`` at the query
    ``positions``: B x H x R x T, float32, computed from the layer's own rotary Q/K and the mask it receives."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None and len(args) > 1:
            position_embeddings = args[1]
        query, key, _ = project_full_qkv(module, hidden_states, position_embeddings)
        length = key.shape[-2]
        rows = positions.to(query.device)
        logits = grouped_scores(query[:, :, rows], key, module.scaling)  # B x H x R x T
        mask = additive_mask(kwargs.get("attention_mask"), length, length, logits.device)[..., rows, :]
        store[module.layer_idx] = torch.softmax(logits + mask, dim=-1)

    handles = [
        attention_of(layer).register_forward_pre_hook(hook, with_kwargs=True) for layer in decoder_layers(model)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------------------
# Sensitivity
# --------------------------------------------------------------------------------------------------------------

_NO_FORWARD = object()


@contextmanager
def _replay_layers(layers: nn.ModuleList, outputs: dict[int, Any], count: int) -> Iterator[None]:
    """Make decoder layers ``0..count-1`` return their recorded outputs instead of computing them.

    Sharing layer ``l`` changes nothing before layer ``l-1``, so the sensitivity pass replays those layers from the
    base run. An instance ``forward`` already present (e.g. an accelerate hook) is put back afterwards.
    """
    saved = []
    try:
        for index in range(count):
            layer = layers[index]
            saved.append((layer, layer.__dict__.get("forward", _NO_FORWARD)))
            layer.forward = _constant(outputs[index])
        yield
    finally:
        for layer, previous in saved:
            if previous is _NO_FORWARD:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous


def _constant(value: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return value

    return forward


def _lm_loss(model: nn.Module, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks, use_cache=False).loss)


def _sensitivity(
    model: nn.Module, blocks: torch.Tensor, permutations: list[Optional[list[int]]], progress: bool
) -> tuple[list[Optional[float]], list[Optional[float]], float]:
    """Loss rise when only layer ``l`` shares (untrained LiSA: direct sharing, METHOD.md "Baselines"), per layer.

    Uses ``peft.get_peft_model(model, LiSAConfig(share_layers=[l]))`` and ``unload()``; the base model's
    ``requires_grad`` flags (which peft clears) are restored, and no ``peft_config`` is left on it.
    """
    from peft import get_peft_model
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    outputs: dict[int, Any] = {}
    handles = [
        layer.register_forward_hook(lambda module, args, output, index=index: outputs.__setitem__(index, output))
        for index, layer in enumerate(layers)
    ]
    try:
        base_loss = _lm_loss(model, blocks)
    finally:
        for handle in handles:
            handle.remove()

    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    direct: list[Optional[float]] = [None] * len(layers)
    permuted: list[Optional[float]] = [None] * len(layers)
    for layer_idx in tqdm(range(1, len(layers)), desc="LiSA analysis: sensitivity", disable=not progress):
        if layer_attention_type(model, layer_idx) != layer_attention_type(model, layer_idx - 1):
            continue  # LiSA never shares across attention types (full vs sliding window)
        config = LiSAConfig(share_layers=[layer_idx], rank=2, align_hidden=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(model, config)
        try:
            with _replay_layers(layers, outputs, layer_idx - 1):
                direct[layer_idx] = _round(_lm_loss(peft_model, blocks) - base_loss)
                perm = permutations[layer_idx]
                if perm is None or perm == list(range(len(perm))):
                    permuted[layer_idx] = direct[layer_idx]
                else:
                    align = _attention_wrapper(layers[layer_idx]).lisa_substitute["default"].align
                    with torch.no_grad():
                        align.permute.copy_(permutation_matrix(perm).to(align.permute))
                    permuted[layer_idx] = _round(_lm_loss(peft_model, blocks) - base_loss)
        finally:
            peft_model.unload()
            model.__dict__.pop("peft_config", None)
            for name, param in model.named_parameters():
                param.requires_grad_(requires_grad[name])
    return direct, permuted, base_loss


def _attention_wrapper(layer: nn.Module) -> LiSALayer:
    attn = layer.self_attn
    if not isinstance(attn, LiSALayer):
        raise RuntimeError(f"Expected a LiSA-wrapped attention, got {type(attn).__name__}.")
    return attn


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def _check_plain_model(model: nn.Module) -> None:
    if any(isinstance(module, LiSALayer) for module in model.modules()) or hasattr(model, "peft_config"):
        raise ValueError(
            "analyze() needs the plain base model, but this one carries PEFT adapters. Pass the base model (e.g. "
            "peft_model.get_base_model() after unload()), or analyse before get_peft_model."
        )
    check_model_supported(model)


def analyze(
    model: nn.Module,
    tokenizer: Any,
    texts: Union[str, Sequence[str]],
    *,
    seq_len: int = 256,
    batch_size: int = 4,
    max_batches: int = 8,
    sensitivity: bool = True,
    progress: bool = True,
    query_rows: int = 64,
    matrix_rows: int = 8,
    sensitivity_sequences: int = 2,
) -> AttentionAnalysis:
    """Measure how similar each layer's attention is to its predecessor's, on calibration text.

    Args:
        model: a supported causal LM (llama, mistral, qwen2, qwen3), not wrapped by PEFT. It is left unchanged.
        tokenizer: its tokenizer (needs an EOS token, which separates the documents).
        texts: calibration documents; empty ones are skipped, short ones join the token stream.
        seq_len: tokens per calibration sequence.
        batch_size: sequences per forward pass.
        max_batches: at most this many batches (``batch_size * max_batches`` sequences, spread over the texts).
        sensitivity: also measure the loss rise of sharing each layer alone (one extra forward pass per layer, two
            where the best permutation is not the identity; layers before ``l-1`` are replayed, not recomputed).
        progress: show tqdm progress bars.
        query_rows: query positions per sequence whose attention rows enter the divergences (evenly spaced; the
            cost of the divergences grows with it). ``seq_len - 1`` or more uses every position.
        matrix_rows: query positions per sequence (a subset of the above) for the L x L layer matrix, whose cost
            grows with the square of the number of layers.
        sensitivity_sequences: sequences (evenly spread over the calibration set) in the sensitivity batch.

    Returns:
        An :class:`AttentionAnalysis`; pass it to :func:`choose_share_layers` or ``LiSAConfig.from_analysis``.

    Raises:
        ValueError: no usable calibration text, bad arguments, or a model that already carries adapters.
    """
    from tqdm.auto import tqdm

    _check_plain_model(model)
    for name, value in (
        ("batch_size", batch_size),
        ("max_batches", max_batches),
        ("query_rows", query_rows),
        ("matrix_rows", matrix_rows),
        ("sensitivity_sequences", sensitivity_sequences),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    blocks = calibration_blocks(tokenizer, texts, seq_len, batch_size * max_batches)
    layers = decoder_layers(model)
    num_layers = len(layers)
    attn0 = attention_of(layers[0])
    num_heads = model.config.num_attention_heads
    num_kv_heads = getattr(model.config, "num_key_value_heads", None) or num_heads
    if num_layers < 2:
        raise ValueError("The model has a single decoder layer: there is no pair of layers to compare.")

    positions = [1 + i for i in _strata(seq_len - 1, query_rows)]  # position 0 attends only to itself
    subset = _strata(len(positions), matrix_rows)  # indices into positions for the L x L matrix
    matrix_positions = [positions[i] for i in subset]
    device = next(attn0.parameters()).device
    inner = getattr(model, "model", model)  # the decoder stack: the LM head is not needed for attention

    adjacent = {layer: torch.zeros(num_heads, num_heads, dtype=torch.float64) for layer in range(1, num_layers)}
    pairwise = {
        (a, b): torch.zeros(num_heads, num_heads, dtype=torch.float64)
        for a in range(num_layers)
        for b in range(a + 1, num_layers)
    }
    adjacent_rows = matrix_count = 0
    was_training = model.training
    model.eval()
    try:
        store: dict[int, torch.Tensor] = {}
        batches = blocks.split(batch_size)
        with _attention_row_hooks(model, torch.tensor(positions), store):
            for batch in tqdm(batches, desc="LiSA analysis: attention", disable=not progress):
                with torch.no_grad():
                    inner(input_ids=batch.to(device), use_cache=False)
                # Adjacent layers: H x H divergences on every selected row (METHOD.md (a)).
                for layer in range(1, num_layers):
                    adjacent[layer] += _js_sum(store[layer], store[layer - 1], positions)
                adjacent_rows += batch.shape[0] * len(positions)
                # All pairs of layers, on the row subset, for the heatmap.
                rows = {layer: store[layer][:, :, subset] for layer in range(num_layers)}
                for (a, b), total in pairwise.items():
                    total += _js_sum(rows[b], rows[a], matrix_positions)
                matrix_count += batch.shape[0] * len(subset)
                store.clear()

        js_indexed: list[Optional[float]] = [None]
        js_matched: list[Optional[float]] = [None]
        js_grouped: list[Optional[float]] = [None]
        permutations: list[Optional[list[int]]] = [None]
        js_heads: list[Optional[list[list[float]]]] = [None]
        for layer in range(1, num_layers):
            mean = (adjacent[layer] / adjacent_rows).numpy()
            perm, matched = best_head_matching(mean)
            _, grouped = best_grouped_matching(mean, num_kv_heads)
            js_indexed.append(_round(np.trace(mean) / num_heads))
            js_matched.append(_round(matched))
            js_grouped.append(_round(grouped))
            permutations.append(perm)
            js_heads.append([[_round(v) for v in row] for row in mean.tolist()])
        js_layers = [[0.0] * num_layers for _ in range(num_layers)]
        for (a, b), total in pairwise.items():
            _, matched = best_head_matching((total / matrix_count).numpy())
            js_layers[a][b] = js_layers[b][a] = _round(matched)

        direct = permuted = None
        base_loss = None
        sens_blocks = blocks[_spread(len(blocks), sensitivity_sequences)]
        if sensitivity:
            direct, permuted, base_loss = _sensitivity(model, sens_blocks.to(device), permutations, progress)
    finally:
        model.train(was_training)

    return AttentionAnalysis(
        model_name=str(getattr(model.config, "_name_or_path", "") or model.config.model_type),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        seq_len=seq_len,
        num_sequences=len(blocks),
        num_tokens=int(blocks.numel()),
        query_rows=len(positions),
        matrix_rows=len(matrix_positions),
        js_indexed=js_indexed,
        js_matched=js_matched,
        js_matched_grouped=js_grouped,
        permutations=permutations,
        js_heads=js_heads,
        js_layers=js_layers,
        sensitivity_direct=direct,
        sensitivity_permuted=permuted,
        base_loss=None if base_loss is None else _round(base_loss),
        sensitivity_tokens=int(sens_blocks.numel()) if sensitivity else 0,
    )


# --------------------------------------------------------------------------------------------------------------
# Layer choice
# --------------------------------------------------------------------------------------------------------------


def choose_share_layers(
    analysis: Union[AttentionAnalysis, str, os.PathLike],
    *,
    fraction: Optional[float] = None,
    threshold: Optional[float] = None,
    keep_first: int = 2,
    score: str = "js_matched",
) -> list[int]:
    """Choose ``share_layers`` from an analysis (METHOD.md, "Layer choice"): lower ``score`` is better.

    Candidates are the layers ``>= keep_first`` (layer 0 never shares; shallow layers are fragile, METHOD.md (a))
    that have a score. ``fraction`` takes the best ``round(fraction * num_layers)`` candidates (a fraction of *all*
    layers, as the paper's 53%-84%); ``threshold`` keeps those whose score is at most ``threshold``; with both, the
    best ``round(fraction * num_layers)`` that are also under the threshold.

    Args:
        analysis: an :class:`AttentionAnalysis` or the path of its JSON.
        fraction: target fraction of shared layers, in (0, 1).
        threshold: largest acceptable score (e.g. a JS divergence in bits, or a loss rise in nats).
        keep_first: the first ``keep_first`` layers always stay full.
        score: one of ``js_matched`` (default), ``js_indexed``, ``js_matched_grouped``, ``sensitivity_direct``,
            ``sensitivity_permuted``.

    Returns:
        The chosen layer indices, ascending.
    """
    if not isinstance(analysis, AttentionAnalysis):
        analysis = AttentionAnalysis.from_json(analysis)
    values = getattr(analysis, score, None)
    return choose_layers(
        values, analysis.num_layers, fraction=fraction, threshold=threshold, keep_first=keep_first, score=score
    )
