"""The identity hashes are pinned: stage keys, sidecars and caches store them, so a changed recipe would
silently rerun (or, worse, refuse) every cached run. The values below were computed before the hashing moved
into `rbrm.files.digest`; they must never change."""

from __future__ import annotations

from pathlib import Path

import torch

from rbrm.evaluation.audit import response_sha
from rbrm.files import digest, file_digest, json_digest
from rbrm.models import model_fingerprint
from rbrm.sampling import call_seed, weights_digest
from rbrm.stages import stage_key

ROWS = b'{"prompt": "hi"}\n' * 3
ANSWER = "I can't help with that."


def test_file_and_text_digests_are_pinned(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(ROWS)
    full = "2c0e6485aa2c384f0c23ab7b13a4225f27a9be16a591331ce5358f3d482a65d3"  # a probe's weights_sha256
    assert file_digest(path) == full[:16]  # a stage key's input file
    assert file_digest(path, None) == full == digest(ROWS, None)
    assert digest(ANSWER) == "4434ac69dedd5ddb"  # the judgment cache's response_sha256
    assert response_sha(ANSWER) == "4434ac69dedd5ddb108e3c6cb8a51b9c28dc6d294b4c10ac695d25e3d33668ea"  # audit labels
    assert digest(ANSWER, 10) == "4434ac69de"


def test_stage_key_is_pinned():
    inputs = {"model": "m", "seed": 0, "layers": [1, 2], "path": Path("/x")}
    assert stage_key(inputs) == json_digest(inputs) == "7887e09f6abd1495"
    assert call_seed(0, [("p", 0, 4)]) == 683105379779114146  # the samples a resumed run draws


def test_model_identities_are_pinned():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # weights that do not depend on torch's random generator
        for i, (_, param) in enumerate(model.named_parameters()):
            param.copy_(torch.linspace(-1, 1, param.numel()).reshape(param.shape) * (i + 1) / 7)
    model.config.name_or_path = "pinned"
    assert model_fingerprint(model)["embedding_sha256"] == "db9f7e8d3fc7a96a"  # a probe's and features' model
    assert weights_digest(model) == "e7aeaf470361fc37"  # a sample file's sidecar
