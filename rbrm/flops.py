"""Compute in FLOPs by the standard estimates, counted from a model's own shapes (the compute ledger).

A token multiplies every matmul weight once: 2 FLOPs per weight forward. Attention adds 4 · width FLOPs per
(query, key) pair and layer (Q·K and the weighted sum of V), where width = heads × head size. Full
fine-tuning's backward costs twice the forward (gradients of activations and of weights); LoRA's costs the
activations' gradient (one forward's worth) plus the adapters' weight gradients. Embeddings are lookups and
cost nothing; element-wise work (norms, activations, softmax) is left out, as in the usual 2N / 6N rule.
`tests/test_flops.py` checks every formula against torch's FLOP counter on a small model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelShape:
    decoder_weights: int  # matmul weights a token passes through below the LM head (LoRA adapters included)
    head_weights: int  # the LM head's
    layers: int
    attention_width: int  # query heads x head size

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        config = model.config
        head = model.get_output_embeddings()  # None for an encoder (a judge's)
        decoder = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(decoder, head.weight.numel() if head is not None else 0, config.num_hidden_layers,
                   config.num_attention_heads * head_dim)


    def first_layers(self, layers: int) -> ModelShape:
        """The shape of a forward that stops after `layers` decoder layers (features of the lower layers only);
        every layer holds the same weights."""
        return ModelShape(self.decoder_weights * layers // self.layers, self.head_weights, layers,
                          self.attention_width)


# Llama-2-7B (32 layers of 4 x 4096^2 attention and 3 x 4096 x 11008 MLP weights, a 32000-token head): the
# report's "what scoring with a 7B reward model would cost", by formula.
LLAMA_7B = ModelShape(32 * (4 * 4096 * 4096 + 3 * 4096 * 11008), 32000 * 4096, 32, 4096)


def forward_flops(shape: ModelShape, lengths: Iterable[int], lm_head: bool = True) -> int:
    """Full forwards of sequences of these lengths (no padding). The attention matrix counts whole (T x T), as
    the dense kernels compute it; features and scoring run without the LM head."""
    total = 0
    for t in lengths:
        total += 2 * (shape.decoder_weights + (shape.head_weights if lm_head else 0)) * t
        total += 4 * shape.layers * shape.attention_width * t * t
    return total


def prefix_forward_flops(shape: ModelShape, prefix: int, continuations: Iterable[int]) -> int:
    """A prompt's forward without the LM head, then each continuation over the prompt's cache (its queries
    attend to the prompt and to themselves): how features and scores are computed for N answers to one prompt."""
    total = forward_flops(shape, [prefix], lm_head=False)
    for t in continuations:
        total += 2 * shape.decoder_weights * t + 4 * shape.layers * shape.attention_width * t * (prefix + t)
    return total


def generation_flops(shape: ModelShape, prompt_length: int, new_tokens: int) -> int:
    """One sequence: the prompt's forward (LM head on its last position only), then one forward per further
    token over the cache (the j-th attends to prompt_length + j positions)."""
    if new_tokens <= 0:
        return 0
    total = forward_flops(shape, [prompt_length], lm_head=False) + 2 * shape.head_weights * new_tokens
    for j in range(1, new_tokens):
        total += 2 * shape.decoder_weights + 4 * shape.layers * shape.attention_width * (prompt_length + j)
    return total


def training_flops(shape: ModelShape, lengths: Iterable[int], trainable_weights: int | None = None) -> int:
    """Forward + backward of training sequences. trainable_weights None: full fine-tuning (3x the forward);
    else only those matmul weights get gradients (LoRA): 2x the forward plus 2 FLOPs per trainable weight and
    token."""
    lengths = list(lengths)
    forward = forward_flops(shape, lengths)
    if trainable_weights is None:
        return 3 * forward
    return 2 * forward + 2 * trainable_weights * sum(lengths)


def probe_flops(layers: int, hidden: int, rows: int, update: bool = False) -> int:
    """The hybrid reward on pooled states: one dot product per layer and row; x2 with its gradient step (the
    states are detached, so only the weights get a gradient)."""
    return (2 if update else 1) * 2 * layers * hidden * rows
