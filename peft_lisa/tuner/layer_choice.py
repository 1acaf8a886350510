"""Which layers share: the rule that turns per-layer scores of a calibration analysis into ``share_layers``.

It lives in the tuner so that ``LiSAConfig.from_analysis`` and ``peft_lisa.analysis.choose_share_layers`` apply the
same rule; the measurement that produces the scores is :func:`peft_lisa.analysis.analyze`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Optional

# The keyword of ``peft_lisa.analyze`` that must be True for an analysis to carry a score (``None``: every analysis
# carries it). The one place that says which measurement produces which score.
_SCORE_SWITCHES = {
    "js_matched": None,
    "js_indexed": None,
    "js_matched_grouped": None,
    "sensitivity_direct": "sensitivity",
    "sensitivity_permuted": "sensitivity",
    "sensitivity_calibrated": "calibrated_sensitivity",
}
SCORES = tuple(_SCORE_SWITCHES)  # the per-layer scores a layer choice may rank by


def score_switch(score: str) -> Optional[str]:
    """The :func:`peft_lisa.analyze` keyword (``"sensitivity"`` or ``"calibrated_sensitivity"``) that must be True
    for an analysis to measure ``score``; ``None`` for the attention scores, which every analysis measures."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}.")
    return _SCORE_SWITCHES[score]


def validate_max_chain(max_chain: Optional[int]) -> None:
    """``max_chain`` is ``None`` (no cap) or a positive integer; else a ``ValueError`` that says so."""
    if max_chain is not None and (isinstance(max_chain, bool) or not isinstance(max_chain, int) or max_chain < 1):
        raise ValueError(f"max_chain must be a positive integer (or None for no cap), got {max_chain!r}.")


def choose_layers(
    values: Optional[Sequence[Optional[float]]],
    num_layers: int,
    *,
    fraction: Optional[float] = None,
    threshold: Optional[float] = None,
    keep_first: int = 2,
    score: str = "js_matched",
    max_chain: Optional[int] = None,
) -> list[int]:
    """Choose ``share_layers`` from one per-layer score (lower is better), as ``docs/method.md`` "Layer choice" says.

    Candidates are the layers ``>= keep_first`` (layer 0 never shares; shallow layers are fragile) that have a score.
    ``fraction`` takes the best ``round(fraction * num_layers)`` candidates (a fraction of *all* layers);
    ``threshold`` keeps those whose score is at most ``threshold``; with both, the best ``round(fraction *
    num_layers)`` that are also under the threshold. ``max_chain`` caps the runs of adjacent shared layers (a chain:
    each link's logits derive from the one before, and without a ``T x T`` tensor held between layers a prefill
    recomputes a link's earlier terms): candidates are taken best first, skipping any that would make a run longer
    than ``max_chain``, so that the next best take their place. Best first is not a search: it may stop short of
    a count that another choice under the cap would reach, and then it says so.

    Args:
        values: the score of every layer (``None`` where not measured), indexed by layer; ``None`` if the analysis
            did not measure this score at all.
        num_layers: decoder layers of the model.
        fraction: target fraction of shared layers, in (0, 1).
        threshold: largest acceptable score (e.g. a JS divergence in bits, or a loss rise in nats).
        keep_first: the first ``keep_first`` layers always stay full.
        score: the name of the score, one of :data:`SCORES` (for messages and the check).
        max_chain: longest run of adjacent shared layers (``None``: no cap).

    Returns:
        The chosen layer indices, ascending.
    """
    switch = score_switch(score)
    if values is None:
        raise ValueError(f"The analysis has no {score!r}: run analyze(..., {switch}=True) to measure it.")
    if fraction is None and threshold is None:
        raise ValueError("Give fraction and/or threshold (e.g. fraction=0.5) to choose the shared layers.")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0.0 < fraction < 1.0
    ):
        raise ValueError(f"fraction must be a number strictly between 0 and 1, got {fraction!r}.")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, Real) or not math.isfinite(threshold)
    ):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}.")
    if isinstance(keep_first, bool) or not isinstance(keep_first, int) or keep_first < 0:
        raise ValueError(f"keep_first must be a non-negative integer, got {keep_first!r}.")
    validate_max_chain(max_chain)

    ranked = sorted(
        (values[layer], layer) for layer in range(max(keep_first, 1), num_layers) if values[layer] is not None
    )
    if not ranked:
        raise ValueError(
            f"No candidate layers: the model has {num_layers} layers and keep_first={keep_first} keeps them all full."
        )
    if threshold is not None and ranked[0][0] > threshold:
        best_value, best_layer = ranked[0]
        raise ValueError(
            f"No candidate layer has {score} <= {threshold}; the lowest is {best_value:.4g} (layer {best_layer})."
        )
    chosen = ranked if max_chain is None else _cap_chains(ranked, max_chain)
    if fraction is not None:
        count = round(fraction * num_layers)
        if count == 0:
            raise ValueError(f"fraction={fraction} of {num_layers} layers rounds to 0 layers; use a larger fraction.")
        if count > len(chosen):
            capped = "" if max_chain is None else f" when taken best first in chains of at most {max_chain}"
            raise ValueError(
                f"fraction={fraction} asks for {count} of {num_layers} layers, but only {len(chosen)} can share"
                f"{capped} (layers {max(keep_first, 1)}..{num_layers - 1} with keep_first={keep_first}); lower the "
                f"fraction or keep_first{'' if max_chain is None else ', or raise max_chain'}."
            )
        chosen = chosen[:count]
    if threshold is not None:
        chosen = [(value, layer) for value, layer in chosen if value <= threshold]
    return sorted(layer for _, layer in chosen)


def _cap_chains(ranked: list[tuple[float, int]], max_chain: int) -> list[tuple[float, int]]:
    """The candidates ``ranked`` (best first) that can share with no run of more than ``max_chain`` adjacent shared
    layers, each taken if the ones before it leave room: a layer joins the runs on either side of it."""
    taken: set[int] = set()
    kept = []
    for value, layer in ranked:
        below = next(i for i in range(layer - 1, -2, -1) if i not in taken)  # the nearest layer under it not taken
        above = next(i for i in range(layer + 1, layer + max_chain + 2) if i not in taken)
        if above - below - 1 <= max_chain:
            taken.add(layer)
            kept.append((value, layer))
    return kept
