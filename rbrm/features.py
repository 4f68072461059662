"""Hidden-state features: every decoder layer's output at the response's end-of-turn token.

One batched forward per batch, no `generate`, no LM head. Forward hooks pool each layer's output as soon
as the layer has run, so the full-sequence hidden states of all layers are never held at once.
Responses that share a prompt share its computation: the prompt runs once, its KV cache is kept, and each
response runs on top of it (a pair costs prompt + 2 responses, not 2 x (prompt + response)).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, DynamicCache
from trl.trainer.utils import pad as trl_pad

from .distributed import is_main, my_turn, splitting, sum_numbers, sum_tensor
from .flops import ModelShape, prefix_forward_flops
from .models import model_fingerprint
from .render import Prompt, end_of_turn, prompt_key, render, tokenize

POOLINGS = ("last", "mean")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (the ModuleList whose length is `num_hidden_layers`)."""
    n = model.config.num_hidden_layers
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for candidate in (getattr(decoder, "layers", None), getattr(decoder, "h", None)):
        if isinstance(candidate, nn.ModuleList) and len(candidate) == n:
            return candidate
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def resolve_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    """1-based layer numbers (l = 1..L, as in the paper); None means all."""
    n = model.config.num_hidden_layers
    if not layers:
        return list(range(1, n + 1))
    bad = [layer for layer in layers if not 1 <= layer <= n]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has layers 1..{n}")
    return sorted(set(layers))


def context_length(model) -> int | None:
    """The model's context window in tokens (None when its config does not say); `model` may be a path."""
    config = getattr(model, "config", None)
    if config is None and isinstance(model, str):
        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError):
            return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def rendered_lengths(tokenizer, rows: list[tuple[Prompt, str]]) -> list[int]:
    """Tokens of each rendered (prompt, response) row, as the model sees it."""
    return [sum(map(len, tokenize(tokenizer, *render(tokenizer, p, r)))) for p, r in rows]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool [B, T, d] over the positions where mask [B, T] is 1: the last such position, or their mean.

    Works for any padding side: positions come from the mask, never from lengths.
    """
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, -1).max(dim=1).values
        if (last < 0).any():
            raise ValueError("a row has no response token to pool")
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


class _StopForward(Exception):
    """Raised after the last requested layer: the layers above it are not needed."""


@contextmanager
def capture_pooled(model: nn.Module, layers: list[int], pooling: str, mask_ref: dict,
                   stop_after_last: bool = False):
    """Hooks that pool layer outputs into `captured[l]` ([B, d], detached) using `mask_ref["mask"]`.

    Used by feature extraction and by the DPO trainer around its one policy forward. The hooks are removed on
    exit, so a later recomputation (gradient checkpointing) never fires them. A mask shorter than the states
    (prompt-learning PEFT prepends virtual tokens) is left-padded with zeros.
    """
    captured: dict[int, torch.Tensor] = {}
    modules = decoder_layers(model) if layers else None
    last = max(layers, default=0)

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            mask = mask_ref["mask"]
            if hidden.shape[1] > mask.shape[1]:
                mask = F.pad(mask, (hidden.shape[1] - mask.shape[1], 0))
            with torch.no_grad():
                captured[layer] = pool(hidden.detach(), mask, pooling)
            if stop_after_last and layer == last:
                raise _StopForward

        return hook

    handles = [modules[layer - 1].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class PromptGroup:
    rows: list[int]  # output row of each response
    prompt_ids: list[int]
    completion_ids: list[list[int]]

    @property
    def cost(self) -> int:
        return len(self.prompt_ids) + max(len(c) for c in self.completion_ids)


def _make_groups(tokenizer, rows: list[tuple[Prompt, str]], share_prefix: bool) -> list[PromptGroup]:
    by_prompt: dict[str, list[int]] = {}
    for i, (prompt, _) in enumerate(rows):
        key = prompt_key(prompt) if share_prefix else str(i)
        by_prompt.setdefault(key, []).append(i)
    groups = []
    for indices in by_prompt.values():
        tokenized = [tokenize(tokenizer, *render(tokenizer, *rows[i])) for i in indices]
        # The shared prompt is the common prefix of the group's prompt tokenisations.
        cut = min(len(p) for p, _ in tokenized)
        full = [p + c for p, c in tokenized]
        prompt_ids = full[0][:cut]
        while cut and any(f[:cut] != prompt_ids for f in full):
            cut -= 1
            prompt_ids = full[0][:cut]
        if cut == 0:
            raise ValueError("a rendered prompt has no tokens")
        # Keep >= 1 completion token per row (the endpoint lives there).
        cut = min(cut, *(len(f) - 1 for f in full))
        groups.append(PromptGroup(indices, full[0][:cut], [f[cut:] for f in full]))
    return groups


# Padding is computed like real tokens; on CPU it cost more than batching saved (16 HH pairs on 2 AVX2 cores,
# fp32: 15.1 s with 69% padding under a 4,096-token budget, 10.2 s with 23%). A batch grows only while its
# padded tokens stay within this fraction above its real ones.
MAX_PADDING = 0.25


def padded_tokens(batch: list[PromptGroup]) -> tuple[int, int]:
    """(padded, real) tokens of a batch: the left-padded prompts, then each completion slot right-padded."""
    padded = max(len(g.prompt_ids) for g in batch) * len(batch)
    real = sum(len(g.prompt_ids) for g in batch)
    for j in range(len(batch[0].completion_ids)):
        padded += max(len(g.completion_ids[j]) for g in batch) * len(batch)
        real += sum(len(g.completion_ids[j]) for g in batch)
    return padded, real


def plan_batches(groups: list[PromptGroup], batch_tokens: int, batch_size: int) -> list[list[PromptGroup]]:
    """Length-sorted batches of at most `batch_size` prompts, `batch_tokens` padded tokens and MAX_PADDING waste."""
    order = sorted(groups, key=lambda g: (len(g.completion_ids), g.cost))
    batches: list[list[PromptGroup]] = []
    current: list[PromptGroup] = []
    for group in order:
        if current:
            padded, real = padded_tokens(current + [group])
            if (padded > batch_tokens or padded > (1 + MAX_PADDING) * real or len(current) >= batch_size
                    or len(current[0].completion_ids) != len(group.completion_ids)):
                batches.append(current)
                current = []
        current.append(group)
    if current:
        batches.append(current)
    return batches


def pad(seqs: list[list[int]], pad_id: int, device, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) for token lists padded on `side` to the longest (TRL's `pad` does both)."""
    ids = [torch.tensor(s, dtype=torch.long) for s in seqs]
    return (trl_pad(ids, pad_id, side).to(device),
            trl_pad([torch.ones_like(t) for t in ids], 0, side).to(device))


@torch.inference_mode()
def extract_features(model, tokenizer, rows: list[tuple[Prompt, str]], layers: list[int] | None = None,
                     pooling: str = "last", batch_tokens: int = 4096, batch_size: int = 64,
                     share_prefix: bool = True,
                     progress: bool = True, stats: dict | None = None) -> torch.Tensor:
    """Features float32 [N, L, d] for (prompt, response) rows, in row order.

    Repeated rows (a response that appears in several pairs) are computed once. `stats`, if given,
    receives the number of tokens run through the model and their FLOPs (`rbrm.flops`).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    layers = resolve_layers(model, layers)
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    unique: dict[tuple[str, str], int] = {}
    row_to_unique = [unique.setdefault((prompt_key(p), r), len(unique)) for p, r in rows]
    first = {u: i for i, u in reversed(list(enumerate(row_to_unique)))}
    rows = [rows[first[u]] for u in range(len(unique))]
    # Zeros, not empty: under a launcher each process fills the rows of its batches and the sum gives every row.
    out = torch.zeros(len(rows), len(layers), model.config.hidden_size, dtype=torch.float32)
    groups = _make_groups(tokenizer, rows, share_prefix)
    stop_early = max(layers) < model.config.num_hidden_layers
    mask_ref: dict = {}
    tokens_run, flops = 0, 0
    shape = ModelShape.of(model)
    shape = shape.first_layers(max(layers)) if stop_early else shape
    bar = tqdm(total=len(rows), desc="features", unit="resp", disable=not progress or not is_main())
    with capture_pooled(model, layers, pooling, mask_ref, stop_after_last=stop_early) as captured:
        for index, batch in enumerate(plan_batches(groups, batch_tokens, batch_size)):
            if not my_turn(index):  # another process's batch (rbrm.distributed)
                continue
            prompt_ids, prompt_mask = pad([g.prompt_ids for g in batch], pad_id, device, side="left")
            positions = (prompt_mask.cumsum(1) - 1).clamp_min(0)
            mask_ref["mask"] = prompt_mask
            cache = DynamicCache(config=model.config)
            try:
                decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            except _StopForward:
                pass
            captured.clear()  # prompt-only states are not features
            tokens_run += int(prompt_mask.sum())
            flops += sum(prefix_forward_flops(shape, len(g.prompt_ids), [len(c) for c in g.completion_ids])
                         for g in batch)
            prompt_lengths = prompt_mask.sum(1, keepdim=True)
            for j in range(len(batch[0].completion_ids)):
                ids, mask = pad([g.completion_ids[j] for g in batch], pad_id, device)
                mask_ref["mask"] = mask
                try:
                    decoder(input_ids=ids, attention_mask=torch.cat([prompt_mask, mask], 1),
                            position_ids=prompt_lengths + torch.arange(ids.shape[1], device=device),
                            past_key_values=cache, use_cache=True)
                except _StopForward:
                    pass
                cache.crop(-ids.shape[1])  # back to the prompt, for the next response
                stacked = torch.stack([captured[layer] for layer in layers], 1).float().cpu()
                out[[g.rows[j] for g in batch]] = stacked
                captured.clear()
                tokens_run += int(mask.sum())
                bar.update(len(batch))
    bar.close()
    out = sum_tensor(out)
    if splitting():
        tokens_run, flops = (int(v) for v in sum_numbers(tokens_run, flops))
    if stats is not None:
        stats["forward_tokens"] = stats.get("forward_tokens", 0) + tokens_run
        stats["flops"] = stats.get("flops", 0) + flops
    return out[row_to_unique]


def feature_metadata(model, tokenizer, layers: list[int], pooling: str) -> dict:
    """What a probe records to refuse features from another model, layer set or pooling."""
    return {"model": model_fingerprint(model), "layers": list(layers), "pooling": pooling,
            "end_of_turn": end_of_turn(tokenizer)}


# ---------------------------------------------------------------------------------------------- files


def examples_to_rows(pairs, labelled) -> tuple[list[tuple[Prompt, str]], torch.Tensor | None, torch.Tensor | None]:
    """Rows to encode, with labels (-1 where unknown) and the pair index into those rows."""
    rows: list[tuple[Prompt, str]] = []
    labels: list[int] = []
    pair_index: list[tuple[int, int]] = []
    for pair in pairs:
        pair_index.append((len(rows), len(rows) + 1))
        rows += [(pair.prompt, pair.chosen), (pair.prompt, pair.rejected)]
        labels += [-1, -1]
    for item in labelled:
        rows.append((item.prompt, item.response))
        labels.append(1 if item.safe else 0)
    label_tensor = torch.tensor(labels, dtype=torch.long) if any(x >= 0 for x in labels) else None
    pair_tensor = torch.tensor(pair_index, dtype=torch.long).reshape(-1, 2) if pair_index else None
    return rows, label_tensor, pair_tensor
