"""How far an aligned policy drifted from the base policy: two figures a degenerate model cannot hide.

* `per_token_kl`: on the method's own answers to benign prompts, the KL divergence KL(policy || base) of the
  next-token distributions at every answer position, averaged over positions. A policy that answers as the base
  model would scores near 0; one that turned every answer into a persona ("I'm glad you're enjoying my help")
  scores high, whatever a judge thinks of the text.
* `opening_share`: the share of answers that open with the method's most common first four words. A persona
  shows at once (the base model's most common opening covers a few percent of its answers).
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..render import Prompt, render, tokenize

OPENING_WORDS = 4
DRIFT_FILE = "drift.json"  # in a method's evaluation folder: {"benign_kl": per_token_kl(...) or None}
_WORD = re.compile(r"[\w']+")


def opening(response: str, words: int = OPENING_WORDS) -> str:
    """The first `words` words, lower-cased, punctuation dropped ("I'm glad you're" -> "i'm glad you're ...")."""
    return " ".join(_WORD.findall(response.lower())[:words])


def opening_share(responses: Sequence[str], words: int = OPENING_WORDS) -> tuple[float | None, str | None]:
    """(share of answers opening with the most common first `words` words, that opening); (None, None) if empty.

    Answers shorter than `words` words count under their own (shorter) opening."""
    openings = [opening(r, words) for r in responses]
    if not openings:
        return None, None
    top, count = Counter(openings).most_common(1)[0]
    return count / len(openings), top


def _answer_log_probs(model, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                      keep: int) -> torch.Tensor:
    """Log-softmax of the next-token logits at the last `keep` positions only (the answers' predictions, with left
    padding): the vocabulary-wide part never runs over prompt positions."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    return F.log_softmax(logits[:, -keep:].float(), dim=-1)


@torch.inference_mode()
def per_token_kl(model, ref_model, tokenizer, rows: Sequence[tuple[Prompt, str]], batch_size: int = 16) -> dict:
    """Mean KL(model || ref_model) over the answer tokens of `rows` (prompt, the model's own answer).

    Each answer is rendered with `rbrm.render.render` (the token contract of every stage) and both models read
    the same tokens; the KL at a position is over the whole vocabulary. Rows are batched by length and padded on
    the left (positions from the mask), so the answers' predictions sit in the last columns and only those are
    scored. Returns {"kl": mean per token, "tokens": answer tokens counted, "answers": answers with a token}.
    """
    sequences = []  # (prompt + answer ids, answer length)
    for prompt, response in rows:
        prompt_ids, answer_ids = tokenize(tokenizer, *render(tokenizer, prompt, response))
        if answer_ids:
            sequences.append((prompt_ids + answer_ids, len(answer_ids)))
    sequences.sort(key=lambda s: len(s[0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(s) for s, _ in batch)
        # position t predicts token t+1: an answer of A tokens is predicted at columns width-A-1 ... width-2
        keep = max(a for _, a in batch) + 1
        ids = torch.tensor([[pad] * (width - len(s)) + s for s, _ in batch], device=device)
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s, _ in batch], device=device)
        positions = (attention.cumsum(1) - 1).clamp_min(0)
        answer = torch.tensor([[0] * (keep - a - 1) + [1] * a + [0] for _, a in batch], device=device,
                              dtype=torch.bool)
        log_p = _answer_log_probs(model, ids, attention, positions, keep)
        log_q = _answer_log_probs(ref_model, ids, attention, positions, keep)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        total += float(kl[answer].sum())
        tokens += int(answer.sum())
    return {"kl": total / tokens if tokens else None, "tokens": tokens, "answers": len(sequences)}
