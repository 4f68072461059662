"""Preference pairs for DPO, with the token contract of `rbrm.render`: rendered, tokenised and collated.

Conversational TRL rows (`prompt` as messages) are rendered with `rbrm.render.render`; text rows are taken as
rendered already (`render`'s prompt text and completion text). Both are tokenised like `rbrm.render.tokenize`: no
special tokens added and no EOS appended, so DPO sees exactly the tokens the probe was trained on and every
completion ends on the end-of-turn token that `render` puts there (TRL would append EOS after it when the
template's end-of-turn marker is not the EOS token, and add a BOS the template already wrote).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from ..errors import DataError
from ..formats import PreferencePair, load_pairs
from ..render import end_of_turn, render, tokenize

# Keys the collator adds to a batch; the trainer takes them out before anything reaches a model.
EXTRA_KEYS = ("confidence", "endpoint_kept", "benign", "safety_margin")


def _response_text(value: Any) -> str:
    """A TRL completion: a string, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return value[-1]["content"]
    raise ValueError(f"expected a completion string or a list ending with an assistant message, got {value!r:.80}")


def render_and_tokenize(example: dict, tokenizer) -> dict:
    """prompt_ids / chosen_ids / rejected_ids with the token contract of `rbrm.render` (see the module doc).

    The prompt ends where the tokenised prompt and prompt+completion diverge, for both completions, as TRL does.
    """
    marker = end_of_turn(tokenizer)
    if isinstance(example["prompt"], list):
        prompt_text, chosen_text = render(tokenizer, example["prompt"], _response_text(example["chosen"]))
        _, rejected_text = render(tokenizer, example["prompt"], _response_text(example["rejected"]))
    else:
        prompt_text = example["prompt"]
        # Like TRL's EOS, but the marker `render` closes responses with: the probe's endpoint token.
        chosen_text, rejected_text = (t if t.endswith(marker) else t + marker
                                      for t in (example["chosen"], example["rejected"]))
    prompt_c, chosen = tokenize(tokenizer, prompt_text, chosen_text)
    prompt_r, rejected = tokenize(tokenizer, prompt_text, rejected_text)
    cut = min(len(prompt_c), len(prompt_r))
    full_c, full_r = prompt_c + chosen, prompt_r + rejected
    return {"prompt_ids": full_c[:cut], "chosen_ids": full_c[cut:], "rejected_ids": full_r[cut:]}


@dataclass
class ConfidenceCollator:
    """Wraps a preference collator: adds the `confidence`, `benign` and `safety_margin` columns and which rows kept
    their endpoint token.

    Rows are [chosen; rejected] as in TRL's collator. With `keep_start` truncation a completion longer than
    `max_length` loses its end, and with it the end-of-turn token the probe reads.
    """

    inner: Any
    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        values = [example.get("confidence") for example in examples]
        if all(v is not None for v in values):
            batch["confidence"] = torch.tensor(values, dtype=torch.float32)
        if "benign" in examples[0]:
            batch["benign"] = torch.tensor([bool(e["benign"]) for e in examples], dtype=torch.bool)
        margins = [example.get("safety_margin") for example in examples]  # SafeDPO's h~_l - h~_w
        if all(m is not None for m in margins):
            batch["safety_margin"] = torch.tensor(margins, dtype=torch.float32)
        if "prompt_ids" in examples[0]:
            def kept(key: str) -> list[bool]:
                return [self.max_length is None or self.truncation_mode == "keep_end"
                        or len(e["prompt_ids"]) + len(e[key]) <= self.max_length for e in examples]

            batch["endpoint_kept"] = torch.tensor(kept("chosen_ids") + kept("rejected_ids"), dtype=torch.bool)
        return batch


def pairs_dataset(path: str, tokenizer, limit: int | None = None, format: str = "auto"):
    """`preference_dataset` of a pair file (any layout `rbrm.formats` reads)."""
    return preference_dataset(load_pairs(path, format=format, limit=limit), tokenizer, source=path)


def _safety_margin(pair: PreferencePair) -> float | None:
    """A pair's SafeDPO `safety_margin` (rbrm.dpo.safedpo), a number >= 0, or None when it has none."""
    value = pair.meta.get("safety_margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise DataError(pair.source or "<pairs>", None, "safety_margin", f"expected a number >= 0, got {value!r}")
    return float(value)


def preference_dataset(pairs: list[PreferencePair], tokenizer, source: str = "the pairs"):
    """A TRL text preference Dataset rendered with `rbrm.render.render` (+ `confidence` when the pairs carry it,
    + `benign` when some pairs were ranked by the helpfulness reward: `kind: benign`, + SafeDPO's `safety_margin`
    when the pairs carry it), for `ConfidenceDPOTrainer`. `rerank.preference_pairs` gives such pairs in memory."""
    rows = []
    for pair in pairs:
        prompt_text, chosen = render(tokenizer, pair.prompt, pair.chosen)
        _, rejected = render(tokenizer, pair.prompt, pair.rejected)
        rows.append({"prompt": prompt_text, "chosen": chosen, "rejected": rejected,
                     "confidence": pair.meta.get("confidence"), "benign": pair.meta.get("kind") == "benign",
                     "safety_margin": _safety_margin(pair)})
    if not any(row["benign"] for row in rows):
        for row in rows:
            del row["benign"]
    for column in ("confidence", "safety_margin"):
        if all(row[column] is None for row in rows):
            for row in rows:
                del row[column]
        elif any(row[column] is None for row in rows):
            raise ValueError(f"{source}: some pairs carry a `{column}` and some do not")
    return Dataset.from_list(rows)
