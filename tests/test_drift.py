"""Degeneration figures: the top-opening share and the per-token KL from the base policy, known by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rbrm.evaluation import opening_share, per_token_kl
from rbrm.evaluation.drift import opening
from rbrm.render import render, tokenize


def test_opening_share_by_hand():
    answers = ["I'm glad you're enjoying my help! Bombs are...", "I'm glad, you're ENJOYING my help. Balloons",
               "I'm glad you're enjoying my help", "Sure, here is a recipe", "Hi"]
    assert opening(answers[1]) == "i'm glad you're enjoying"
    share, top = opening_share(answers)
    assert top == "i'm glad you're enjoying" and share == pytest.approx(3 / 5)
    assert opening_share([]) == (None, None)
    assert opening_share(["a b", "c d"])[0] == pytest.approx(1 / 2)


class _FixedLogits(nn.Module):
    """A 'model' whose next-token logits at a position are a table row chosen by the input token (mod the rows)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.table[input_ids % self.table.shape[0]])


def test_per_token_kl_by_hand(tokenizer):
    vocab = 16  # the logits' width: KL is over it, whatever the tokenizer's size
    p_table, q_table = torch.zeros(8, vocab), torch.zeros(8, vocab)
    p_table[:, 0] = 2.0  # every position: p = softmax([2, 0, ..., 0]), q = uniform
    policy, base = _FixedLogits(p_table), _FixedLogits(q_table)
    rows = [("Say hi", "Hi there"), ("Count", "one two three")]
    kl = per_token_kl(policy, base, tokenizer, rows, batch_size=1)
    # by hand: p puts e^2 on token 0 and 1 on every other token; q is uniform over the vocabulary
    z = math.e ** 2 + (vocab - 1)
    p0, p_rest = math.e ** 2 / z, 1 / z
    expected = p0 * math.log(p0 * vocab) + (vocab - 1) * p_rest * math.log(p_rest * vocab)
    n_tokens = sum(len(tokenize(tokenizer, *render(tokenizer, p, r))[1]) for p, r in rows)
    assert kl["tokens"] == n_tokens and kl["answers"] == 2
    assert kl["kl"] == pytest.approx(expected, rel=1e-4)
    # padded batches give the same figure; a model against itself gives 0
    assert per_token_kl(policy, base, tokenizer, rows, batch_size=2)["kl"] == pytest.approx(expected, rel=1e-4)
    assert per_token_kl(policy, policy, tokenizer, rows)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_per_token_kl_on_a_tiny_model_is_positive(tiny_model, tokenizer):
    from tests.conftest import make_tiny_model

    other = make_tiny_model(tokenizer, seed=1)
    rows = [("Say hi", "Hi there, how are you?")]
    assert per_token_kl(tiny_model, other, tokenizer, rows)["kl"] > 0
    assert per_token_kl(tiny_model, tiny_model, tokenizer, rows)["kl"] == pytest.approx(0.0, abs=1e-5)
