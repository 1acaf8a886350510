"""Calibration analysis: how similar is each layer's attention to its predecessor's, and which layers can share.

``docs/method.md``, "What the paper establishes": in trained LLMs the attention weights of adjacent layers are similar
for most layers, measured as the Jensen-Shannon divergence (JS) between attention distributions; heads are not
aligned by index, and shallow layers are fragile. ``docs/method.md``, "Layer choice": ``share_layers`` can be chosen
automatically from such an analysis, keeping the first layers full; and ("Our design", step 2) the best head
permutation initialises ``P`` of the head alignment.

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
  untrained LiSA adapter on that layer alone), with the identity and with the best permutation;
* optionally the *calibrated sensitivity* (``sensitivity_calibrated``): how far the output moves (KL to the base)
  when only that layer shares after a short layer-wise calibration, the score the jobs choose layers by.

GQA: the matching is unconstrained on purpose. LiSA aligns the per-*query*-head logits of layer ``l-1``; a shared
layer keeps its own values and its own (low-rank) keys per KV group, so any head of layer ``l-1`` can feed any head
of layer ``l`` whatever their KV groups. As a diagnostic, ``js_matched_grouped`` reports the best matching that keeps
KV groups together (all query heads of one KV group of layer ``l`` come from a single KV group of layer ``l-1``):
the permutations a head-permuted copy of layer ``l-1``'s Q/K weights would produce. For MHA models both coincide.

Divergences are in bits (log base 2), so they lie in ``[0, 1]``. Attention probabilities are computed from the
model's own query/key projections (rotary, ``q_norm``/``k_norm``) by hooks, whatever the model's attention
implementation, and the model is never modified: the sensitivity pass wraps and unwraps it with ``unload()`` and
restores its ``requires_grad`` flags and train/eval mode.

Modules, each importing only those above it:

* :mod:`.result`: :class:`AttentionAnalysis` (JSON, summary table, plots);
* :mod:`.divergence`: JS divergences between heads and the best head matchings;
* :mod:`.calibration`: calibration token blocks and the choice of query rows;
* :mod:`.sensitivity`: loss rise when a single layer shares;
* :mod:`.measure`: :func:`analyze`, which records attention rows by hooks and puts the above together;
* :mod:`.choice`: :func:`choose_share_layers`, which applies ``peft_lisa.tuner.layer_choice.choose_layers``.
"""

from .choice import choose_share_layers
from .divergence import best_grouped_matching, best_head_matching, js_divergence_matrix
from .measure import CALIBRATED_SCORE_SETTINGS, analyze
from .result import ANALYSIS_FORMAT_VERSION, AttentionAnalysis
from .sampling import calibration_blocks

__all__ = [
    "ANALYSIS_FORMAT_VERSION",
    "CALIBRATED_SCORE_SETTINGS",
    "AttentionAnalysis",
    "analyze",
    "best_grouped_matching",
    "best_head_matching",
    "calibration_blocks",
    "choose_share_layers",
    "js_divergence_matrix",
]
