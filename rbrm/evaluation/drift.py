"""How far an aligned policy drifted from the base policy: two figures a degenerate model cannot hide.

* `per_token_kl`: on the method's own answers to benign prompts, the KL divergence KL(policy || base) of the
  next-token distributions at every answer position, averaged over positions. A policy that answers as the base
  model would scores near 0; one that turned every answer into a persona ("I'm glad you're enjoying my help")
  scores high, whatever a judge thinks of the text.
* `opening_share`: the share of answers that open with the method's most common first four words. A persona
  shows at once (the base model's most common opening covers a few percent of its answers).
"""

from __future__ import annotations

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


@torch.inference_mode()
def per_token_kl(model, ref_model, tokenizer, rows: Sequence[tuple[Prompt, str]], batch_size: int = 16) -> dict:
    """Mean KL(model || ref_model) over the answer tokens of `rows` (prompt, the model's own answer).

    Each answer is rendered with `rbrm.render.render` (the token contract of every stage) and both models read
    the same tokens; the KL at a position is over the whole vocabulary. Padding is on the right and masked.
    Returns {"kl": mean per token, "tokens": answer tokens counted, "answers": answers with a token}.
    """
    sequences, masks = [], []
    for prompt, response in rows:
        prompt_ids, answer_ids = tokenize(tokenizer, *render(tokenizer, prompt, response))
        if not answer_ids:
            continue
        sequences.append(prompt_ids + answer_ids)
        # position t predicts token t+1: the predictions of the answer tokens sit at len(prompt)-1 ... end-1
        masks.append([0] * (len(prompt_ids) - 1) + [1] * len(answer_ids) + [0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch, mask = sequences[start:start + batch_size], masks[start:start + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=device)
        answer = torch.tensor([m + [0] * (width - len(m)) for m in mask], device=device, dtype=torch.bool)
        log_p = F.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
        log_q = F.log_softmax(ref_model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        total += float(kl[answer].sum())
        tokens += int(answer.sum())
    return {"kl": total / tokens if tokens else None, "tokens": tokens, "answers": len(sequences)}
