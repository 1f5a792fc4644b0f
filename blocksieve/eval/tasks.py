"""Long-context tasks on a causal LM: passkey retrieval and perplexity.

* **Passkey** (Mohtashami & Jaggi, "Landmark Attention", 2023): a random 5-digit key is hidden at a
  given depth inside real filler text (a chunk of :func:`blocksieve.eval.texts.load_text`), and the
  prompt ends with "What is the pass key? The pass key is". The model decodes greedily with
  ``generate()`` and its KV cache; a trial counts as correct when the first 5-digit number in the
  answer is the key. Depth ``d`` puts the needle after a fraction ``d`` of the filler tokens.
* **Perplexity**: the text is cut into consecutive, non-overlapping windows of ``length`` tokens;
  each window is run in one forward pass and only its last ``score_tokens`` tokens (default a
  quarter of the window) are scored, so every scored token sees at least ``length - score_tokens``
  tokens of context. That measures long-context prediction, where sparse attention matters, rather
  than the short-context start of a window.

Both take any model whose forward runs the attention under test (a plain transformers model for the
dense baseline, or one patched by :func:`blocksieve.integrations.transformers.sparsify`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from blocksieve.eval.texts import token_chunk

__all__ = ["PasskeyPrompt", "passkey_prompt", "passkey_trial", "passkey_grid", "perplexity"]

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"

_KEY = re.compile(r"\d{5}")


def _ids(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt.

    Attributes:
        input_ids: ``[1, length]`` int64 token ids.
        key: the 5-digit key as a string.
        depth: requested depth in [0, 1].
        needle_start, needle_end: token span ``[start, end)`` of the needle sentence in ``input_ids``.
        filler_start, filler_end: token span of the filler text (the needle sits inside it).
    """

    input_ids: torch.Tensor
    key: str
    depth: float
    needle_start: int
    needle_end: int
    filler_start: int
    filler_end: int


def passkey_prompt(tokenizer, text: str, length: int, depth: float, key: str, offset: int = 0) -> PasskeyPrompt:
    """Build a passkey prompt of exactly ``length`` tokens.

    Args:
        tokenizer: the model's tokenizer.
        text: real filler text (e.g. ``load_text("kjv")``); ``offset`` tokens of it are skipped.
        length: total prompt length in tokens.
        depth: fraction of the filler placed before the needle, in [0, 1].
        key: the 5 digits to hide.

    Returns:
        a :class:`PasskeyPrompt`; the needle starts at ``filler_start + round(depth * n_filler)``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1] (0 = start of the filler, 1 = end)")
    if not (len(key) == 5 and key.isdigit()):
        raise ValueError(f"key={key!r} must be 5 digits")
    special = list(tokenizer("", add_special_tokens=True)["input_ids"])
    intro, needle, question = _ids(tokenizer, INTRO), _ids(tokenizer, NEEDLE.format(key=key)), _ids(tokenizer, QUESTION)
    n_filler = length - len(special) - len(intro) - len(needle) - len(question)
    if n_filler < 1:
        raise ValueError(f"length={length} is too short for a passkey prompt: use at least {length - n_filler + 1} tokens")
    filler = token_chunk(tokenizer, text, n_filler + len(special), offset)[0, len(special) :].tolist()
    cut = round(depth * n_filler)
    head = special + intro + filler[:cut]
    ids = head + needle + filler[cut:] + question
    start = len(special) + len(intro)
    return PasskeyPrompt(
        input_ids=torch.tensor([ids], dtype=torch.long),
        key=key,
        depth=depth,
        needle_start=len(head),
        needle_end=len(head) + len(needle),
        filler_start=start,
        filler_end=start + n_filler + len(needle),
    )


@torch.no_grad()
def passkey_trial(model, tokenizer, prompt: PasskeyPrompt, max_new_tokens: int = 8) -> dict:
    """Greedy-decode the answer with ``generate()`` (KV cache on); returns ``{correct, answer, key}``."""
    ids = prompt.input_ids.to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    found = _KEY.search(answer)
    return {"correct": bool(found and found.group() == prompt.key), "answer": answer.strip(), "key": prompt.key}


def passkey_grid(
    model,
    tokenizer,
    text: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 2,
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: bool = True,
    desc: str = "passkey",
) -> dict:
    """Accuracy over ``lengths × depths`` with ``trials`` keys/filler offsets per cell.

    Trial ``t`` uses a key drawn from ``seed`` and skips ``t * 997`` tokens of the text, so each
    trial sees different filler. Keys and offsets do not depend on the model: every method of a run
    answers the same prompts.

    Returns:
        ``{"lengths", "depths", "accuracy": [[acc per depth] per length], "samples": [...]}``.
    """
    gen = torch.Generator().manual_seed(seed)
    keys = [str(int(torch.randint(10000, 100000, (1,), generator=gen))) for _ in range(trials)]
    cells = [(length, depth, t) for length in lengths for depth in depths for t in range(trials)]
    hits: dict = {}
    samples = []
    for length, depth, t in tqdm(cells, desc=desc, disable=not progress, leave=False):
        prompt = passkey_prompt(tokenizer, text, length, depth, keys[t], offset=t * 997)
        res = passkey_trial(model, tokenizer, prompt, max_new_tokens)
        hits.setdefault((length, depth), []).append(res["correct"])
        samples.append({"length": length, "depth": depth, "trial": t, **res})
    acc = [[sum(hits[(n, d)]) / trials for d in depths] for n in lengths]
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": acc, "samples": samples}


@torch.no_grad()
def perplexity(
    model,
    input_ids: torch.Tensor,
    length: int,
    windows: int = 2,
    score_tokens: Optional[int] = None,
    progress: bool = True,
    desc: str = "perplexity",
    on_forward: Optional[Callable[[float], None]] = None,
) -> dict:
    """Perplexity of the last ``score_tokens`` tokens of ``windows`` consecutive ``length``-token windows.

    Args:
        input_ids: ``[1, N]`` or ``[N]`` token ids of a long text, ``N >= windows * length``.
        length: window length (the context each forward pass sees).
        windows: number of consecutive non-overlapping windows.
        score_tokens: tokens scored at the end of each window, default ``length // 4``.
        on_forward: called with each forward pass's wall time in seconds.

    Returns:
        ``{"ppl", "nll", "tokens", "length", "windows", "score_tokens"}``; ``nll`` is the mean
        natural-log loss per scored token.
    """
    ids = input_ids.reshape(-1)
    score = length // 4 if score_tokens is None else score_tokens
    if not 1 <= score < length:
        raise ValueError(f"score_tokens={score} must lie in [1, length={length})")
    if ids.numel() < windows * length:
        raise ValueError(f"input_ids has {ids.numel()} tokens; {windows} windows of {length} need {windows * length}")
    total, count = 0.0, 0
    for w in tqdm(range(windows), desc=desc, disable=not progress, leave=False):
        window = ids[w * length : (w + 1) * length][None].to(model.device)
        start = time.perf_counter()
        logits = model(window, use_cache=False, logits_to_keep=score + 1).logits[0, :-1].float()
        if on_forward is not None:
            on_forward(time.perf_counter() - start)
        target = window[0, -score:]
        total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += score
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "length": length, "windows": windows, "score_tokens": score}
