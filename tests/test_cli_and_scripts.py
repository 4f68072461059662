"""Model resolution, the paper-compatible script, the PCA figure, and YAML configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rbrm.cli import main


def write_pairs(path, n=12):
    rows = [{"prompt": f"How do I do harmful thing {i}?", "chosen": "Sorry, I can't help with that.",
             "rejected": f"Sure! Step one for thing {i}: get the tools."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_resolve_model_errors(tmp_path):
    from rbrm.models import resolve_model

    with pytest.raises(FileNotFoundError, match="unknown model"):
        resolve_model("no-such-alias")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_mos_train_checks_dim_against_model(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    script = [sys.executable, "mos_train.py", "--data_path", str(data), "--model_path", tiny_model_dir,
              "--write_path", str(tmp_path / "rm")]
    bad = subprocess.run(script + ["--dim", "4096"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--dim 4096 does not match the model (64)" in bad.stderr
    from mos_train import main as mos_main

    assert mos_main(script[2:] + ["--dim", "64", "--layer", "3", "--epochs", "3", "--model_name", "tiny",
                                  "--no_baseline"]) == 0
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["model_name"] == "tiny" and config["hidden_size"] == 64 and config["num_layers"] == 3


def test_probe_plot_from_features(tmp_path, capsys):
    from rbrm.feature_files import save_features

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 3, 8, generator=g)
    feats[::2] += 2.0
    path = tmp_path / "f.safetensors"
    save_features(str(path), feats, {"layers": [2, 4, 6]}, pair_index=torch.arange(40).reshape(20, 2))
    out = tmp_path / "pca.png"
    assert main(["probe", "plot", "--features", str(path), "--out", str(out), "--layers", "2", "6"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["probe", "plot", "--features", str(path), "--out", str(out), "--layers", "3"]) == 2
    assert "rbrm probe plot: error: layer 3 is not in these features" in capsys.readouterr().err


def test_yaml_config_with_flag_override(tiny_model_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    config = tmp_path / "probe.yaml"
    config.write_text(f"data: {data}\nmodel: {tiny_model_dir}\nout: {tmp_path / 'rm'}\nepochs: 2\nbaseline: false\n"
                      f"metrics_out: {tmp_path / 'm.json'}\n")
    assert main(["probe", "train", "--config", str(config), "--seed", "3"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["settings"]["seed"] == 3 and metrics["settings"]["epochs"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataa: x\n")
    assert main(["probe", "train", "--config", str(bad)]) == 2
    assert "unknown option(s) dataa" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_features_and_probe(tmp_path):
    """The real model: the endpoint is <|im_end|>, prompt sharing matches plain forwards, a probe trains."""
    from rbrm.features import examples_to_rows, extract_features
    from rbrm.formats import load_pairs
    from rbrm.models import load_model
    from rbrm.reward_model import RewardTrainConfig, train_reward_model

    model, tokenizer = load_model(dtype="float32", device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    pairs = load_pairs("data/xstest/derived_unsafe_prompt_pairs_pku_format.jsonl", limit=24)
    rows, _, pair_index = examples_to_rows(pairs, [])
    rows = [(p, r[:300]) for p, r in rows]  # keep the slow test short
    shared = extract_features(model, tokenizer, rows, progress=False)
    plain = extract_features(model, tokenizer, rows[:4], share_prefix=False, progress=False)
    torch.testing.assert_close(shared[:4], plain, atol=2e-3, rtol=1e-3)
    assert shared.shape == (48, 30, 576) and torch.isfinite(shared).all()
    _, metrics = train_reward_model(shared, pair_index, None, RewardTrainConfig(epochs=30, val_fraction=0.25),
                                    progress=False)
    assert metrics["val_pair_accuracy"] >= 0.5 and len(metrics["per_layer_accuracy"]) == 30


def test_every_command_has_one_shape():
    """Config dataclasses and a function that takes one instance of each; `--out` names what a command writes."""
    import dataclasses
    import inspect

    from rbrm.cli import COMMANDS, load_spec

    for words, (config_specs, func_spec, _) in COMMANDS.items():
        classes = [load_spec(spec) for spec in config_specs.split()]
        assert classes and all(dataclasses.is_dataclass(c) for c in classes), words
        required = [p for p in inspect.signature(load_spec(func_spec)).parameters.values() if p.default is p.empty]
        assert len(required) == len(classes), words
        own = {f.name for f in dataclasses.fields(classes[0])}
        assert not own & {"out_dir", "output_dir", "output", "out_path"} or words == ("pipeline",), words


def test_one_parser_merges_repeated_lists_and_applies_machine_defaults(monkeypatch):
    from rbrm.commands import parse_config
    from rbrm.commands.dpo import DPOCommandConfig
    from rbrm.commands.evaluate import EvalConfig
    from rbrm.commands.pipeline import PipelineCommandConfig
    from rbrm.dpo import ConfidenceDPOConfig

    config = parse_config(EvalConfig, ["--out", "o", "--prompts", "a", "--where", "x=1", "--prompts", "b", "c"],
                          prog="rbrm eval")
    assert config.prompts == ["a", "b", "c"] and config.where == ["x=1"]
    # rbrm pipeline's --config is its own field (the run YAML), not a file of options to read
    (args,) = parse_config([PipelineCommandConfig], ["--config", "run.yaml", "--set", "a=1", "--set", "b=2"],
                           prog="rbrm pipeline")
    assert args.config == "run.yaml" and args.set == ["a=1", "b=2"]
    monkeypatch.setattr(DPOCommandConfig, "cli_defaults", staticmethod(lambda: {"use_cpu": True, "beta": 0.25}))
    script, dpo = parse_config([DPOCommandConfig, ConfidenceDPOConfig], ["--pairs", "p", "--output_dir", "d"],
                               prog="rbrm dpo")
    assert script.pairs == "p" and dpo.beta == 0.25 and dpo.use_cpu
    _, dpo = parse_config([DPOCommandConfig, ConfidenceDPOConfig], ["--pairs", "p", "--output_dir", "d",
                                                                     "--beta", "0.5"], prog="rbrm dpo")
    assert dpo.beta == 0.5  # a flag overrides the machine's default
