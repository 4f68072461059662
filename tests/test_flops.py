"""The FLOP formulas against torch's own counter (matmuls and attention) on a small Llama with grouped KV heads."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rbrm.flops import (
    ModelShape,
    forward_flops,
    generation_flops,
    prefix_forward_flops,
    probe_flops,
    training_flops,
)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
                         attn_implementation="eager")  # torch counts no FLOPs in CPU sdpa kernels
    return LlamaForCausalLM(config).eval()


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_shape_counts_the_matmul_weights(model):
    shape = ModelShape.of(model)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160  # q, o; k, v (2 KV heads of 16); gate, up, down
    assert shape == ModelShape(3 * per_layer, 300 * 64, 3, 64)


@pytest.mark.parametrize("lengths", [[17], [9, 9]])
def test_forward(model, lengths):
    ids = torch.randint(0, 300, (len(lengths), lengths[0]))
    expected = forward_flops(ModelShape.of(model), lengths)
    assert counted(lambda: model(input_ids=ids)) == pytest.approx(expected, rel=1e-6)


def test_forward_without_the_lm_head(model):
    ids = torch.randint(0, 300, (1, 12))
    expected = forward_flops(ModelShape.of(model), [12], lm_head=False)
    assert counted(lambda: model.model(input_ids=ids)) == pytest.approx(expected, rel=1e-6)


def test_answers_over_a_cached_prompt(model):
    from transformers import DynamicCache

    prompt, answers = torch.randint(0, 300, (1, 9)), [torch.randint(0, 300, (1, t)) for t in (5, 7)]

    def run():
        cache = DynamicCache(config=model.config)
        model.model(input_ids=prompt, past_key_values=cache, use_cache=True)
        for ids in answers:
            model.model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache.crop(-ids.shape[1])
    assert counted(run) == pytest.approx(prefix_forward_flops(ModelShape.of(model), 9, [5, 7]), rel=1e-6)


def test_a_forward_that_stops_after_some_layers(model):
    from transformers import LlamaForCausalLM

    config = model.config.to_dict() | {"num_hidden_layers": 2}
    two = LlamaForCausalLM(type(model.config).from_dict(config))
    assert ModelShape.of(model).first_layers(2) == ModelShape.of(two)


def test_generation(model):
    ids = torch.randint(0, 300, (1, 10))
    flops = counted(lambda: model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                           pad_token_id=0))
    assert flops == pytest.approx(generation_flops(ModelShape.of(model), 10, 6), rel=1e-6)


def test_full_fine_tuning_and_lora(model):
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, 300, (2, 11))
    full = counted(lambda: model(input_ids=ids, labels=ids).loss.backward())
    # the loss's own matmul-free work is not counted by either; 3x the forward, within torch's bookkeeping
    assert full == pytest.approx(training_flops(ModelShape.of(model), [11, 11]), rel=0.01)
    model.zero_grad()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora = counted(lambda: peft_model(input_ids=ids, labels=ids).loss.backward())
    assert lora == pytest.approx(training_flops(ModelShape.of(peft_model), [11, 11], trainable), rel=0.02)
    assert lora < 0.75 * full
    peft_model.unload()


def test_probe():
    weight, rows = torch.randn(30, 576, requires_grad=True), torch.randn(8, 30, 576)
    flops = counted(lambda: torch.einsum("bld,ld->bl", rows, weight).sum().backward())
    assert flops == probe_flops(30, 576, 8, update=True)
