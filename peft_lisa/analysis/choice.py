"""Layer choice from an analysis: :func:`choose_share_layers` (``docs/method.md``, "Layer choice").

The rule itself is ``peft_lisa.tuner.layer_choice.choose_layers``, shared with ``LiSAConfig.from_analysis``.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from ..tuner.layer_choice import choose_layers
from .result import AttentionAnalysis


def choose_share_layers(
    analysis: Union[AttentionAnalysis, str, os.PathLike],
    *,
    fraction: Optional[float] = None,
    threshold: Optional[float] = None,
    keep_first: int = 2,
    score: str = "js_matched",
    max_chain: Optional[int] = None,
) -> list[int]:
    """Choose ``share_layers`` from an analysis (``docs/method.md``, "Layer choice"): lower ``score`` is better.

    Candidates are the layers ``>= keep_first`` that have a score (layer 0 never shares; shallow layers are fragile,
    ``docs/method.md``, "What the paper establishes"). ``fraction`` takes the best ``round(fraction * num_layers)``
    candidates (a fraction of *all* layers, as the paper's 53%-84%); ``threshold`` keeps those whose score is at most
    ``threshold``; with both, the best ``round(fraction * num_layers)`` that are also under the threshold;
    ``max_chain`` caps the runs of adjacent shared layers, the next best candidates taking the place of those that
    would lengthen one. The rule is ``peft_lisa.tuner.layer_choice.choose_layers``, the one
    ``LiSAConfig.from_analysis`` applies.

    Args:
        analysis: an :class:`AttentionAnalysis` or the path of its JSON.
        fraction: target fraction of shared layers, in (0, 1).
        threshold: largest acceptable score (e.g. a JS divergence in bits, or a loss rise in nats).
        keep_first: the first ``keep_first`` layers always stay full.
        score: one of ``js_matched`` (default), ``js_indexed``, ``js_matched_grouped``, ``sensitivity_direct``,
            ``sensitivity_permuted``.
        max_chain: longest run of adjacent shared layers (``None``: no cap); shorter chains prefill faster on CPU
            (``docs/method.md``, "The cost of a chain").

    Returns:
        The chosen layer indices, ascending.
    """
    if not isinstance(analysis, AttentionAnalysis):
        analysis = AttentionAnalysis.from_json(analysis)
    values = getattr(analysis, score, None)
    return choose_layers(
        values,
        analysis.num_layers,
        fraction=fraction,
        threshold=threshold,
        keep_first=keep_first,
        score=score,
        max_chain=max_chain,
    )
