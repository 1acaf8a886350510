"""Evaluation of a (LiSA) causal LM: sliding-window perplexity on held-out text, agreement of a lower precision with
float32, and greedy sample generations.

They take any causal LM that ``transformers`` can run: a plain model, a ``PeftModel`` with a LiSA adapter
(active or inside ``disable_adapter()``), a merged LiSA model, or a 4-bit quantized one (but
:func:`precision_agreement`, which needs a float32 model).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

DEFAULT_PROMPTS: tuple[str, ...] = (
    "What is a Python decorator?",
    "Explain the difference between a list and a tuple.",
    "Write a haiku about the sea.",
    "What does the `with` statement do?",
)
"""A few short prompts for :func:`generate_samples`: Python questions (in-domain for the pydoc texts) and one not."""


@dataclass
class PerplexityResult:
    """Result of :func:`perplexity`.

    Attributes:
        ppl: ``exp(nll)``.
        nll: Mean negative log-likelihood (nats) per scored token.
        num_tokens: Number of scored tokens (each scored exactly once).
        window: Window length (tokens of context + scored tokens per forward).
        stride: Step between window starts; tokens after the first window see at least ``window - stride`` tokens
            of context.
    """

    ppl: float
    nll: float
    num_tokens: int
    window: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward takes transformers' ``logits_to_keep`` (every causal LM of transformers does; a
    ``PeftModel`` passes it on to its base model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _stream_ids(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token ids of the texts joined by blank lines (as in the Hugging Face perplexity guide), no special tokens."""
    if isinstance(texts, str):
        texts = [texts]
    texts = [text for text in texts if text and text.strip()]
    if not texts:
        raise ValueError("Got no non-empty texts to evaluate on.")
    return list(tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"])


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows ``(begin, end, first_scored)`` of the standard sliding-window evaluation over ``num_tokens``.

    Window ``i`` feeds tokens ``[begin, end)`` to the model and scores the predictions of tokens
    ``[first_scored, end)``: the tokens not scored by an earlier window. Token 0 is never scored (nothing predicts
    it); with ``stride < window`` every other token is scored exactly once, with at least ``window - stride`` tokens
    of context from the second window on. With ``stride == window`` (disjoint windows) the first token of each
    window has no context and is not scored.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if num_tokens < 2:
        raise ValueError(f"Need at least 2 tokens for a perplexity, got {num_tokens}.")
    windows = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        windows.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == num_tokens:
            break
    return windows


@dataclass
class PrecisionAgreement:
    """Result of :func:`precision_agreement`: a model run in a lower precision against itself in float32.

    Attributes:
        dtype: The lower precision (``"bfloat16"``, ``"float16"``).
        kl_mean: Mean over scored positions of ``KL(p_float32 || p_dtype)`` of the next-token distributions (nats).
        kl_max: Its largest value at one position.
        ppl_float32: Perplexity of the float32 model on the scored tokens.
        ppl: Perplexity of the model in ``dtype`` on the same tokens.
        num_tokens: Number of scored tokens.
        window: Tokens per window (disjoint windows; every token but a window's first is scored).
    """

    dtype: str
    kl_mean: float
    kl_max: float
    ppl_float32: float
    ppl: float
    num_tokens: int
    window: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def precision_agreement(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    dtype: torch.dtype = torch.bfloat16,
    *,
    window: int = 1024,
    num_windows: int = 8,
    batch_size: int = 2,
    progress: bool = True,
) -> PrecisionAgreement:
    """How far ``model`` (float32) moves when run in ``dtype``: its next-token distributions on the first
    ``num_windows`` disjoint windows of ``window`` tokens of ``texts`` (joined and tokenised as :func:`perplexity`
    does), against a copy of it in ``dtype``. The same measurement of the base model gives the scale of ``dtype``'s own
    rounding, against which a merged LiSA model's is read (``docs/method.md``, "Rounding the mixed queries").

    Holds a second copy of the model in ``dtype`` while it runs, and both models' float32 log-probabilities of one
    batch (``batch_size x window x vocabulary`` each); ``model`` itself is left as it was.

    Raises:
        ValueError: ``model`` is not float32, or the texts give fewer than ``window`` tokens.
    """
    if any(param.dtype != torch.float32 for param in model.parameters()):
        raise ValueError("precision_agreement() compares a float32 model with its copy in dtype: pass it in float32.")
    if window < 2 or num_windows < 1 or batch_size < 1:
        raise ValueError(
            f"window must be >= 2, num_windows and batch_size >= 1; got {window}, {num_windows}, {batch_size}"
        )
    ids = _stream_ids(tokenizer, texts)
    num_windows = min(num_windows, len(ids) // window)
    if num_windows < 1:
        raise ValueError(
            f"The texts give {len(ids)} tokens, fewer than one window of {window}: pass a smaller window."
        )
    windows = torch.tensor(ids[: num_windows * window], dtype=torch.long).view(num_windows, window)
    dtype_name = str(dtype).removeprefix("torch.")
    device = _model_device(model)
    lowered = copy.deepcopy(model).to(dtype)
    was_training = model.training
    model.eval()
    lowered.eval()
    kl_sum, kl_max, nll_sum, nll_low_sum = 0.0, 0.0, 0.0, 0.0
    try:
        starts = range(0, num_windows, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"float32 against {dtype_name}", unit="batch")
        for start in starts:
            input_ids = windows[start : start + batch_size].to(device)
            reference = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            lowered_lp = lowered(input_ids=input_ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            kl = (reference.exp() * (reference - lowered_lp)).sum(-1)  # B x (T - 1)
            kl_sum += kl.sum().item()
            kl_max = max(kl_max, kl.max().item())
            targets = input_ids[:, 1:, None]
            nll_sum -= reference.gather(-1, targets).sum().item()
            nll_low_sum -= lowered_lp.gather(-1, targets).sum().item()
    finally:
        model.train(was_training)
    count = num_windows * (window - 1)
    return PrecisionAgreement(
        dtype=dtype_name,
        kl_mean=kl_sum / count,
        kl_max=kl_max,
        ppl_float32=math.exp(nll_sum / count),
        ppl=math.exp(nll_low_sum / count),
        num_tokens=count,
        window=window,
    )


@torch.no_grad()
def copying_nll(
    model: torch.nn.Module,
    *,
    length: int = 64,
    runs: int = 8,
    vocab_size: Optional[int] = None,
    first_id: int = 100,
    seed: int = 0,
) -> float:
    """In-context copying: the mean negative log-likelihood (nats) of the second occurrence of ``runs`` runs of
    ``length`` random tokens, each run repeated once in its sequence (2 x ``length`` tokens), the second occurrence's
    first token left out (nothing announces the repeat).

    The first occurrence is unpredictable (about ``log(vocab_size)``); a model with induction heads predicts most of
    the second from the first: SmolLM2-135M-Instruct scores about 2.4-2.8 nats. Comparing a LiSA model with its base
    (``disable_adapter()``) shows how much of that its shared layers keep. Tokens are drawn uniformly from ids
    ``first_id`` (past the special tokens most vocabularies start with) to ``vocab_size - 1`` (default: the model's
    ``config.vocab_size``), with a fixed ``seed``.
    """
    if length < 2 or runs < 1:
        raise ValueError(f"length must be >= 2 and runs >= 1, got length={length}, runs={runs}")
    vocab_size = vocab_size or model.config.vocab_size
    if not 0 <= first_id < vocab_size - 1:
        raise ValueError(
            f"copying_nll draws tokens from ids first_id={first_id} to vocab_size - 1 = {vocab_size - 1}: choose a "
            "first_id below vocab_size - 1"
        )
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(first_id, vocab_size, (runs, length), generator=generator)
    input_ids = torch.cat([first, first], dim=1).to(_model_device(model))  # runs x 2 length
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, length:-1].float()  # runs x (length - 1) x V
    finally:
        model.train(was_training)
    targets = input_ids[:, length + 1 :]  # the second occurrence but its first token
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    window: int = 256,
    stride: int = 128,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    progress: bool = True,
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on ``texts`` (the Hugging Face "perplexity of fixed-length models").

    The texts are joined by blank lines and tokenised once, without special tokens. Windows of ``window`` tokens
    start every ``stride`` tokens; the first window scores all its tokens (but the first), every later window only
    the ``stride`` tokens that are new to it, so each token is scored once, with at least ``window - stride`` tokens
    of context. Windows of equal length run in batches of ``batch_size``; a model whose forward takes
    ``logits_to_keep`` (transformers' causal LMs, and a ``PeftModel`` of one) runs its LM head only on the positions
    that predict scored tokens. Returns ``exp`` of the mean negative
    log-likelihood over all scored tokens. ``max_tokens`` keeps only the first ``max_tokens`` tokens of the stream
    (a cheaper, still deterministic evaluation); ``None`` uses all.

    Raises:
        ValueError: ``texts`` is empty or gives fewer than two tokens, or ``window`` / ``stride`` are invalid.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = _stream_ids(tokenizer, texts)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 (or None), got {max_tokens}")
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"The texts give {len(ids)} token(s); a perplexity needs at least 2.")
    windows = sliding_windows(len(ids), window, stride)
    stream = torch.tensor(ids, dtype=torch.long)
    device = _model_device(model)

    # Group windows of equal length (all but possibly the last) so that batches need no padding.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for item in windows:
        groups.setdefault(item[1] - item[0], []).append(item)
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]

    trim_logits = _takes_logits_to_keep(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=f"perplexity (window {window}, stride {stride})", unit="batch")
        for batch in iterator:
            input_ids = torch.stack([stream[begin:end] for begin, end, _ in batch]).to(device)
            length = input_ids.shape[1]
            # The LM head runs only on the last `keep` positions: those that predict a scored token, and the last.
            keep = max(end - first for _, end, first in batch) + 1 if trim_logits else length
            extra = {"logits_to_keep": keep} if trim_logits else {}
            logits = model(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False, **extra
            ).logits  # B x keep x V
            # Position p of the window predicts token p + 1; score the new tokens [first, end) of each window.
            for row, (begin, end, first) in enumerate(batch):
                start = first - begin - 1 - (length - keep)  # position first - begin - 1 among the kept ones
                scored_logits = logits[row, start : start + end - first].float()
                targets = input_ids[row, first - begin : end - begin]
                total_nll += F.cross_entropy(scored_logits, targets, reduction="sum").item()
                total_tokens += end - first
    finally:
        model.train(was_training)
    nll = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, num_tokens=total_tokens, window=window, stride=stride)


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 40,
) -> list[str]:
    """Greedy completions of ``prompts``, one string (the new text only) per prompt.

    Each prompt is wrapped as a user turn with the tokenizer's chat template when it has one (with the generation
    prompt), and used as plain text otherwise. Prompts are batched with left padding.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        return []
    if getattr(tokenizer, "chat_template", None):
        inputs = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            for prompt in prompts
        ]
        add_special_tokens = False  # the template already holds them
    else:
        inputs, add_special_tokens = prompts, True
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        encoded = tokenizer(inputs, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = pad_token
    encoded = {key: value.to(_model_device(model)) for key, value in encoded.items()}
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    finally:
        model.train(was_training)
    new_tokens = output[:, encoded["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def repeated_ngram(text: str, max_n: int = 4, min_repeats: int = 3, phrase_words: int = 3) -> Optional[str]:
    """The phrase a looping generation repeats, or None: the shortest run of ``n <= max_n`` words that occurs
    ``min_repeats`` times in a row ("decorator decorator decorator", "tuple, tuple, tuple"; punctuation and case
    ignored), or a phrase of ``phrase_words`` words that occurs ``min_repeats`` times anywhere in the text."""
    words = [word for word in (token.strip(".,;:!?\"'()[]`").lower() for token in text.split()) if word]
    for n in range(1, max_n + 1):
        for start in range(len(words) - n * min_repeats + 1):
            phrase = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == phrase for k in range(1, min_repeats)):
                return " ".join(phrase)
    counts: dict[tuple[str, ...], int] = {}
    for start in range(len(words) - phrase_words + 1):
        key = tuple(words[start : start + phrase_words])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= min_repeats:
            return " ".join(key)
    return None
