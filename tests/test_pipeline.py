"""`rbrm pipeline`: config checking, stage caching and resume, compute ledger, report (tiny model; one real run)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

SAMPLING_PROMPTS = "data/refusal_direction/harmful_train.json"


def tiny_config(tmp_path, model_dir: str, **changes) -> str:
    """5 methods on the tiny model in ~20 s. 4 prompts x 2 samples, 4 DPO steps of 2 pairs: RBRM trains two epochs
    over its 4 re-ranked pairs, online samples afresh in each of its 2 rounds."""
    config = {
        "name": "tiny", "model": model_dir, "out_dir": str(tmp_path / "runs"),
        "methods": ["base", "dpo_static", "dpo_rerank", "rbrm", "online"],
        "probe": {"data": "data/xstest/derived_unsafe_prompt_pairs_pku_format.jsonl", "limit": 16, "epochs": 3,
                  "baseline": False},
        "sample": {"prompts": SAMPLING_PROMPTS, "limit": 4, "n": 2, "max_new_tokens": 6},
        "dpo": {"max_steps": 4, "per_device_train_batch_size": 2, "max_length": 64, "learning_rate": 1e-3,
                "disable_tqdm": True},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "static_pairs": {"data": "data/hh_rlhf_harmless_test/derived_pku_format.jsonl", "limit": 4,
                         "max_prompt_tokens": 40},
        "online": {"rounds": 2},
        # The first 2 sampling prompts are also evaluation prompts here: the pipeline must drop them from training.
        "eval": {"prompts": [f"rd={SAMPLING_PROMPTS}:limit=2", "advbench=data/advbench/harmful_behaviors.csv:limit=3"],
                 "over_refusal_limit": 3, "max_new_tokens": 4, "judge": "refusal", "bootstrap": 50,
                 "second_judge": "minilm"},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run(path: str, *flags: str) -> dict:
    from rbrm.cli import run_command

    assert run_command(("pipeline",), ["--config", path, *flags]) == 0
    with open(os.path.join(yaml.safe_load(open(path))["out_dir"], "tiny", "report.json")) as f:
        return json.load(f)


def stage_records(run_dir) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(run_dir):
        if "stage.json" in files and not root.endswith(".old"):
            with open(os.path.join(root, "stage.json")) as f:
                out[os.path.relpath(root, run_dir)] = f.read()
    return out


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("change, message", [
    ({"epochs": 3}, "unknown setting(s) epochs"),
    ({"dpo": {"max_stepz": 3}}, "`dpo` has unknown key(s) max_stepz"),
    ({"rerank": {"top_kk": 1}}, "`rerank` has unknown key(s) top_kk; known: alpha"),
    ({"probe": {"out": "elsewhere"}}, "`probe` has unknown key(s) out"),  # the pipeline sets it
    ({"sample": {"n": "eight"}}, "`sample.n` must be int, got 'eight'"),
    ({"sample": {"temperature": True}}, "`sample.temperature` must be float"),
    ({"eval": {"over_refusal": "no"}}, "`eval.over_refusal` must be bool"),
    ({"methods": ["base", "ppo"]}, "`methods` must be"),
    ({"online": {"rounds": 3}}, "multiple of `online.rounds` (3)"),
    ({"online": {"samples": "some"}}, "`online.samples` must be one of updates, all; got 'some'"),
    ({"eval": {"prompts": []}}, "`eval.prompts`"),
    ({"sample": "x"}, "`sample` must be a mapping"),
    ({"seeds": [1, 1]}, "`seeds` must be a non-empty list of distinct integers"),
    ({"seeds": "0,1"}, "`seeds` must be"),
    # the sections the stages build their own objects from: checked by building those objects
    ({"dpo": {"learning_rate": "fast"}}, "`dpo.learning_rate` must be float, got 'fast'"),
    ({"dpo": {"learning_rate": "1e-4"}}, "write 1.0e-4"),
    ({"dpo": {"confidence_floor": 1.5}}, "`dpo.confidence_floor`: confidence_floor=1.5 must lie in [0, 1]"),
    ({"dpo": {"lr_scheduler_type": "nope"}}, "`dpo.lr_scheduler_type`: nope is not a valid SchedulerType"),
    ({"probe": {"epochs": "many"}}, "`probe.epochs` must be int, got 'many'"),
    ({"probe": {"pooling": "max"}}, "`probe.pooling`: pooling='max': choose one of last, mean"),
    ({"helpfulness_probe": {"data": "x.jsonl", "layers": [1, "x"]}}, "`helpfulness_probe.layers` must be a list of int"),
    ({"lora": {"r": "x"}}, "`lora.r` must be int, got 'x'"),
    ({"lora": {"bias": "some"}}, "`lora.bias` must be one of none, all, lora_only, got 'some'"),
])
def test_config_errors_name_the_file_and_key(tmp_path, change, message):
    from rbrm.run_config import PipelineConfigError, load_config

    path = tiny_config(tmp_path, "unused", **change)
    with pytest.raises(PipelineConfigError) as err:
        load_config(path)
    assert path in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("section,key,value,message", [
    ("dpo", "learning_rate", "fast", "`dpo.learning_rate` must be float"),
    ("dpo", "learning_rat", 1e-4, "`dpo` has unknown key(s) learning_rat"),
    ("probe", "gate", "max", "`probe.gate`: gate='max'"),
    ("lora", "lora_dropout", "none", "`lora.lora_dropout` must be float"),
])
def test_a_bad_setting_fails_before_any_stage_runs(tmp_path, tiny_model_dir, capsys, section, key, value, message):
    """A bad DPO (probe, LoRA) value used to fail only after the stages before DPO had run."""
    from rbrm.cli import main

    path = tiny_config(tmp_path, tiny_model_dir, **{section: {key: value}})
    assert main(["pipeline", "--config", path]) == 2
    err = capsys.readouterr().err
    assert path in err and message in err
    assert not (tmp_path / "runs").exists()  # no run folder, no stage


def test_what_the_dpo_section_says_is_what_training_uses(tmp_path, tiny_model_dir):
    from rbrm.run_config import load_config
    from rbrm.run_context import RunContext

    config = load_config(tiny_config(tmp_path, tiny_model_dir, dpo={"max_steps": 4, "save_steps": 3}),
                         {"device": "cpu"})
    args = RunContext(config).dpo_args("rbrm", str(tmp_path / "out"))
    for key in ("precompute_ref_log_probs", "save_steps", "max_steps", "seed", "confidence_floor", "reward_lr"):
        assert config.dpo_setting(key) == getattr(args, key), key
    assert args.precompute_ref_log_probs is True and args.save_steps == 3 and args.use_cpu


def test_set_overrides_one_setting(tmp_path):
    from rbrm.run_config import PipelineConfigError, load_config

    path = tiny_config(tmp_path, "unused")
    config = load_config(path, {"set": ["dpo.learning_rate=2e-4", "seeds=[3, 4]", "eval.over_refusal=false"]})
    assert config.dpo["learning_rate"] == 2e-4 and config.dpo["max_steps"] == 4  # the rest of the section stays
    assert config.seeds == [3, 4] and config.eval.over_refusal is False
    assert config.eval.judge == "refusal" and config.eval.batch_prompts == 16  # the file's value, and the default
    assert load_config(path, {"set": ["eval.prompts=data/advbench/harmful_behaviors.csv"]}).eval.prompts == [
        "data/advbench/harmful_behaviors.csv"]  # one set may be given without a list
    with pytest.raises(PipelineConfigError, match="`dpo` has unknown key"):
        load_config(path, {"set": ["dpo.learning_rat=1"]})
    with pytest.raises(PipelineConfigError, match="expected KEY=VALUE"):
        load_config(path, {"set": ["dpo.learning_rate"]})


def test_benign_pool_prompts_follow_the_harmful_ones_minus_evaluation_prompts(tmp_path, tiny_model_dir):
    from rbrm.run_config import load_config
    from rbrm.run_context import RunContext

    benign = "data/refusal_direction/harmless_val.json"
    path = tiny_config(tmp_path, tiny_model_dir, sample={"benign_prompts": benign, "benign_skip": 1, "benign_limit": 3},
                       eval={"prompts": [f"rd={SAMPLING_PROMPTS}:limit=2", f"hv={benign}:benign,limit=2"]})
    pipeline = RunContext(load_config(path))
    prompts = pipeline.training_prompts()
    harmful, rest = prompts[:4], prompts[4:]
    instructions = [r["instruction"] for r in json.load(open(benign))]
    assert [p.prompt for p in harmful] == [r["instruction"] for r in json.load(open(SAMPLING_PROMPTS))[2:6]]
    # the 2 evaluation prompts go first, then `benign_skip` 1, then `benign_limit` 3
    assert [p.prompt for p in rest] == instructions[3:6] and all(p.id.startswith("benign:") for p in rest)
    assert pipeline.excluded_training_prompts == 4


def test_borderline_prompts_join_the_benign_pool_with_their_own_ids(tmp_path, tiny_model_dir):
    from rbrm.rerank import is_benign_id
    from rbrm.run_config import PipelineConfigError, load_config
    from rbrm.run_context import RunContext

    benign, borderline = "data/refusal_direction/harmless_val.json", "data/borderline/train.json"
    path = tiny_config(tmp_path, tiny_model_dir, sample={"benign_prompts": benign, "benign_limit": 2,
                                                         "borderline_prompts": [f"bl={borderline}:limit=3"]},
                       eval={"prompts": [f"rd={SAMPLING_PROMPTS}:limit=2", f"one={borderline}:benign,limit=1"]})
    pipeline = RunContext(load_config(path))
    prompts = pipeline.training_prompts()
    written = [r["instruction"] for r in json.load(open(borderline))]
    # the evaluation prompt (the file's first row) is dropped before the limit; ids stay apart from Alpaca's
    assert [p.prompt for p in prompts[-3:]] == written[1:4]
    assert [p.id for p in prompts[-3:]] == ["benign:bl:1", "benign:bl:2", "benign:bl:3"]
    assert all(is_benign_id(p.id) for p in prompts[-5:]) and len({p.id for p in prompts}) == len(prompts)
    assert pipeline.excluded_training_prompts == 3
    with pytest.raises(PipelineConfigError, match="borderline_prompts"):
        load_config(path, {"set": ["sample.borderline_prompts=data/borderline/train.json"]})


def test_a_missing_pool_prompt_file_fails_before_the_probe_runs(tmp_path, tiny_model_dir, capsys):
    from rbrm.cli import main

    path = tiny_config(tmp_path, tiny_model_dir, sample={"borderline_prompts": ["data/borderline/missing.json"]})
    assert main(["pipeline", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "data/borderline/missing.json" in err and "file not found" in err
    assert not list(tmp_path.glob("runs/*/probe"))  # no stage ran


def test_an_rbrm_setting_does_not_change_plain_dpos_stage_key(tmp_path, tiny_model_dir):
    from rbrm.run_config import load_config
    from rbrm.run_context import RunContext

    path = tiny_config(tmp_path, tiny_model_dir)
    plain = RunContext(load_config(path))
    ablated = RunContext(load_config(path, {"set": ["dpo.reward_update=false", "dpo.confidence_floor=0.2"]}))
    for method in ("dpo_rerank", "dpo_static", "online"):
        assert plain.dpo_settings_of(method) == ablated.dpo_settings_of(method)
    assert plain.dpo_settings_of("rbrm") != ablated.dpo_settings_of("rbrm")
    faster = RunContext(load_config(path, {"set": ["dpo.learning_rate=0.5"]}))
    assert plain.dpo_settings_of("dpo_rerank") != faster.dpo_settings_of("dpo_rerank")


def test_dpo_precision_follows_the_cpu_unless_the_config_says_and_is_in_the_stage_key(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    import rbrm.dpo.config
    from rbrm.run_config import load_config
    from rbrm.run_context import RunContext

    path = tiny_config(tmp_path, tiny_model_dir)
    seen = {}
    for fast in (True, False):
        monkeypatch.setattr(rbrm.dpo.config, "cpu_prefers_bf16", lambda fast=fast: fast)
        pipeline = RunContext(load_config(path, {"device": "cpu"}))
        assert pipeline.dpo_args("rbrm", str(tmp_path / "out")).bf16 is fast
        seen[fast] = {m: pipeline.dpo_settings_of(m) for m in ("rbrm", "dpo_rerank", "online")}
        forced = RunContext(load_config(path, {"device": "cpu", "set": ["dpo.bf16=false"]}))
        assert forced.dpo_args("rbrm", str(tmp_path / "out")).bf16 is False
        assert forced.dpo_settings_of("rbrm")["bf16"] is False
    for method in ("rbrm", "dpo_rerank", "online"):  # another precision is another stage
        assert seen[True][method] != seen[False][method]


def test_the_inference_stages_keys_hold_the_resolved_precision(tmp_path, tiny_model_dir, monkeypatch):
    """`auto` is bf16 on one CPU and fp32 on another (measured): the probe, sample, rerank, evaluation and online
    stages must not reuse outputs made in the other precision; an explicit dtype is the same everywhere."""
    import rbrm.models
    from rbrm.run_config import load_config
    from rbrm.run_context import RunContext
    from rbrm.run_stages import EvalStage, OnlineStage, ProbeStage, RerankStage, SampleStage

    def stage_inputs(fast: bool, **changes) -> dict:
        monkeypatch.setattr(rbrm.models, "cpu_prefers_bf16", lambda: fast)
        ctx = RunContext(load_config(tiny_config(tmp_path, tiny_model_dir, **changes), {"device": "cpu"}))
        seen = {}
        for make in (ProbeStage, SampleStage, RerankStage, lambda c: EvalStage(c, "base"),
                     lambda c: next(iter(OnlineStage(c).before()))):
            stage = make(ctx)
            seen[stage.name] = stage.inputs()
            ctx.records[stage.name] = {"key": stage.name}
        return seen

    bf16, fp32 = stage_inputs(True), stage_inputs(False)
    for name in ("probe", "sample", "rerank", "base/eval", "online_rounds/round_0"):
        assert bf16[name] != fp32[name], name
    assert bf16["sample"]["dtype"] == "torch.bfloat16" and fp32["sample"]["dtype"] == "torch.float32"
    fixed = {"dtype": "float32"}
    explicit = [stage_inputs(fast, probe=fixed, sample=fixed, rerank=fixed, eval=fixed) for fast in (True, False)]
    assert explicit[0] == explicit[1]


def test_online_samples_from_the_current_policy_in_the_sampling_precision(tmp_path, tiny_model_dir):
    """Round 0 samples from the shared inference model; later rounds from the base with the previous round's
    adapter merged in, in `sample.dtype`: the same function as the trainable policy, in another precision."""
    import torch
    from peft import get_peft_model

    from rbrm.online import sampling_policy, trainable_policy
    from rbrm.run_config import load_config
    from rbrm.run_context import RunContext

    ctx = RunContext(load_config(tiny_config(tmp_path, tiny_model_dir, sample={"dtype": "float32"}), {"device": "cpu"}))
    base = ctx.inference_model("float32")[0]
    assert sampling_policy(ctx.model_path, None, True, "float32", "cpu", base) is base
    trained = get_peft_model(ctx.training_model(), ctx.config.lora_config())
    with torch.no_grad():
        for name, weight in trained.named_parameters():
            if "lora_B" in name:  # B starts at 0; a non-zero B makes the adapter change the function
                weight.normal_(0, 0.5)
    adapter = str(tmp_path / "adapter")
    trained.save_pretrained(adapter)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        merged = sampling_policy(ctx.model_path, adapter, True, "float32", "cpu")
        assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
        want = trainable_policy(ctx.model_path, adapter, True, "cpu").eval()(ids).logits
        assert torch.allclose(merged(ids).logits, want, atol=1e-4)
        assert not torch.allclose(base(ids).logits, want, atol=1e-2)  # the adapter matters: the check above means something
    assert sampling_policy(ctx.model_path, adapter, True, "bfloat16", "cpu").dtype == torch.bfloat16


def test_shipped_configs_load():
    from rbrm.run_config import load_config

    for name in ("quick", "compare", "paper", "seeds", "tune", "compute", "select"):
        config = load_config(f"configs/{name}.yaml")
        assert config.name == name and "rbrm" in config.methods
    quick = load_config("configs/quick.yaml")
    for name in ("compare", "seeds", "select"):  # make run's RBRM, so settings chosen on select are make run's
        other = load_config(f"configs/{name}.yaml")
        assert dataclasses.replace(other.sample, exclude=None) == quick.sample, name
        assert (other.probe, other.helpfulness_probe, other.dpo, other.lora) == (
            quick.probe, quick.helpfulness_probe, quick.dpo, quick.lora), name
    compare = load_config("configs/compare.yaml")
    assert compare.methods == ["base", "dpo_static", "dpo_rerank", "rbrm", "online", "safedpo"]
    assert load_config("configs/seeds.yaml").seeds == [0, 1, 2]
    assert load_config("configs/compute.yaml").online_rounds == [1, 2, 4, 8]
    paper = load_config("configs/paper.yaml")
    assert (paper.sample.n, paper.sample.max_new_tokens, paper.sample.limit, paper.dpo["beta"]) == (
        8, 256, 4000, 0.15)


# -------------------------------------------------------------------------------------------- stages


def test_run_stage_caches_reruns_on_change_and_keeps_time_of_killed_runs(tmp_path):
    from rbrm.stages import run_stage

    directory = str(tmp_path / "stage")
    calls = []

    def body(d):
        calls.append(d)
        with open(os.path.join(d, "out.txt"), "a") as f:
            f.write("x")
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed half-way: the next run resumes in the same folder
        return {"generated_tokens": 5}

    with pytest.raises(KeyboardInterrupt):
        run_stage(directory, {"a": 1}, body, "s")
    assert not os.path.exists(os.path.join(directory, "stage.json"))
    record = run_stage(directory, {"a": 1}, body, "s")
    assert open(os.path.join(directory, "out.txt")).read() == "xx"  # resumed, not wiped
    assert record["compute"]["generated_tokens"] == 5 and record["compute"]["wall_seconds"] >= 0
    assert run_stage(directory, {"a": 1}, body, "s") == record and len(calls) == 2  # cached
    run_stage(directory, {"a": 2}, body, "s")  # changed: the old outputs are kept aside, the stage reruns
    assert len(calls) == 3 and open(os.path.join(directory, "out.txt")).read() == "x"
    assert open(os.path.join(directory + ".old", "out.txt")).read() == "xx"


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the CPU counter reads /proc/stat")
def test_cpu_counter_counts_other_processes_and_not_this_one():
    from rbrm.machine import cpu_counters, other_cpu_seconds

    before = cpu_counters()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 1.0\n"
                              "while time.process_time() < end: pass\nprint('done', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:  # read while the child lives: a child not yet waited for is another process, not this one
        assert child.stdout.readline().strip() == "done"
        others, machine_seconds = other_cpu_seconds(before, cpu_counters())
    finally:
        child.kill()
        child.wait()
    assert 0.7 <= others <= machine_seconds

    before = cpu_counters()
    _burn(1.0)  # this process's own work is not "other"
    after = cpu_counters()
    others, _ = other_cpu_seconds(before, after)
    assert others < (after[0] - before[0]) - 0.5
    assert other_cpu_seconds(None, after) is None


def test_run_stage_records_the_cpu_others_took_and_the_report_marks_it(tmp_path):
    from rbrm.report import time_mark, time_note
    from rbrm.stages import run_stage

    directory = str(tmp_path / "stage")
    record = run_stage(directory, {"a": 1}, lambda d: _burn(0.2), "s")
    share = record["compute"]["other_cpu_share"]
    assert share is None if not os.path.exists("/proc/stat") else 0.0 <= share <= 1.0
    # A ledger from before the counter (no cpu_seconds) resumes with the share unknown, not a made-up one.
    legacy = str(tmp_path / "legacy")
    os.makedirs(legacy)
    from rbrm.stages import stage_key
    with open(os.path.join(legacy, "key.json"), "w") as f:
        json.dump({"key": stage_key({"a": 1}), "inputs": {"a": 1}, "wall_seconds": 3.0}, f)
    assert run_stage(legacy, {"a": 1}, lambda d: None, "s")["compute"]["other_cpu_share"] is None

    assert [time_mark(v) for v in (0.01, 0.3, None)] == ["", "*", "?"]
    assert time_note([{"a": 0.0, "b": 0.02}]).startswith("Nothing else ran")
    note = time_note([{"a": 0.2, "b": 0.6}, {"c": None}])
    assert "20%–60%" in note and "not a speed figure" in note and "`?`" in note
    assert "took 9% of" in time_note([{"a": 0.09, "b": 0.0}])  # one shared stage: one figure, not "9%–9%"


def test_paired_difference_and_verdict():
    from rbrm.report import _verdict, paired_difference

    a = {f"p{i}": False for i in range(40)}
    b = {f"p{i}": i < 30 for i in range(40)}
    diff = paired_difference(a, b, 500, 0)
    assert diff["n"] == 40 and diff["difference"] == pytest.approx(-0.75) and diff["ci"][1] < 0
    assert _verdict("rbrm", "base", diff).endswith("rbrm is safer.")
    same = paired_difference(a, {**a, "p0": True}, 500, 0)
    assert _verdict("rbrm", "base", same).endswith("no clear difference at this sample size.")
    assert paired_difference(a, {"other": True}, 10, 0) is None


# ---------------------------------------------------------------------------------------- end to end


def test_pipeline_end_to_end_tiny(tmp_path, tiny_model_dir, capsys):
    from rbrm.files import read_jsonl
    from rbrm.models import load_model

    path = tiny_config(tmp_path, tiny_model_dir)
    report = run(path)
    run_dir = tmp_path / "runs" / "tiny"
    methods = report["methods"]
    assert list(methods) == ["base", "dpo_static", "dpo_rerank", "rbrm", "online"]
    for name, row in methods.items():
        for key in ("unsafe_rate", "over_refusal_rate", "helpfulness_rate", "generated_tokens", "forward_tokens",
                    "wall_seconds"):
            assert isinstance(row[key], (int, float)), (name, key)
        assert row["harmful_n"] == 5 and row["over_refusal_n"] == 3 == row["helpfulness_n"]
        assert len(row["helpfulness_rate_ci"]) == 2
        assert 0 <= row["second_judge_unsafe_rate"] <= 1 and len(row["second_judge_unsafe_rate_ci"]) == 2
    assert set(methods["rbrm"]["vs_second_judge"]) == set(methods["rbrm"]["vs"])
    comparisons = [f for f in report["findings"] if not f.startswith("**FLAG")]
    assert comparisons and all("Second judge (minilm)" in f and "under both judges" in f for f in comparisons)
    # every comparison with base says what it cost in helpfulness; flagged methods are the ones keeping < 80%
    assert all("Helpfulness" in f for f in comparisons if " vs base:" in f)
    flagged = {m for m, row in methods.items() if row.get("helpfulness_flag")}
    assert flagged == {m for m, row in methods.items() if m != "base" and row.get("helpfulness_kept", 1.0) < 0.8}
    assert len(report["findings"]) - len(comparisons) == len(flagged)
    assert methods["base"]["generated_tokens"] == methods["base"]["forward_tokens"] == 0
    assert methods["dpo_static"]["generated_tokens"] == 0 < methods["dpo_static"]["forward_tokens"]
    # Re-ranked methods share stages 1-2 and train on the same pairs for the same steps.
    assert methods["rbrm"]["generated_tokens"] == methods["dpo_rerank"]["generated_tokens"] > 0
    assert methods["rbrm"]["forward_tokens"] == methods["dpo_rerank"]["forward_tokens"]
    # Online samples 2 rounds x 4 prompts x 2 responses (RBRM once: 4 x 2) and scores every sample again.
    samples = read_jsonl(str(run_dir / "sample" / "samples.jsonl"))
    round_rows = [read_jsonl(str(run_dir / "online_rounds" / f"round_{r}" / "samples.jsonl")) for r in (0, 1)]
    assert len(samples) == 8 and [len(rows) for rows in round_rows] == [8, 8]
    assert methods["online"]["generated_tokens"] == sum(r["num_tokens"] for rows in round_rows for r in rows)
    ratio = report["compute_ratio_online_over_rbrm"]
    assert ratio["generated_tokens"] == pytest.approx(
        methods["online"]["generated_tokens"] / methods["rbrm"]["generated_tokens"])
    # The FLOP ledger: each method's total is its stages' sum, sampling is the generation formula over the
    # samples it wrote, and DPO's count grows with the pairs it trained on.
    from rbrm.flops import ModelShape, generation_flops
    from rbrm.models import load_tokenizer
    from rbrm.render import render_prompt

    for name in ("dpo_rerank", "rbrm", "online", "dpo_static"):
        row = methods[name]
        assert row["flops"] == sum(c.get("flops", 0) for c in row["compute_by_stage"].values()) > 0, name
        # judging: the keyword judge costs nothing, the second judge and the helpfulness measure encode text
        assert row["eval_flops"]["generation"] > 0 and row["eval_flops"]["judges"] > 0
    tokenizer = load_tokenizer(tiny_model_dir)
    shape = ModelShape.of(load_model(tiny_model_dir, dtype="float32")[0])
    prompt_length = {r["prompt_id"]: len(tokenizer(render_prompt(tokenizer, r["prompt"]), add_special_tokens=False)
                                          .input_ids) for r in samples}
    assert methods["rbrm"]["compute_by_stage"]["sample"]["flops"] == sum(
        generation_flops(shape, prompt_length[r["prompt_id"]], r["num_tokens"]) for r in samples)
    # rbrm and dpo_rerank train on the same pairs; rbrm adds the probe's forward and update
    assert methods["rbrm"]["compute_by_stage"]["rbrm"]["flops"] > methods["dpo_rerank"]["compute_by_stage"][
        "dpo_rerank"]["flops"]
    # Evaluation prompts never reach training: the 2 shared ones were dropped before `limit`.
    eval_prompts = {p["instruction"] for p in json.load(open(SAMPLING_PROMPTS))[:2]}
    assert not eval_prompts & {r["prompt"] for r in samples}
    assert report["excluded_training_prompts"] >= 2
    # Each trained method's merged model loads as a plain model folder and differs from the base.
    base, _ = load_model(tiny_model_dir, dtype="float32")
    for name in ("dpo_static", "dpo_rerank", "rbrm", "online"):
        model, _ = load_model(str(run_dir / name / "model"), dtype="float32")
        assert not all(bool((a == b).all()) for a, b in zip(model.parameters(), base.parameters())), name
    assert methods["rbrm"]["training"]["confidence/mean"]["last"] >= 0.5  # the floor
    assert os.path.isdir(run_dir / "rbrm" / "train" / "reward_model")  # the probe that kept learning
    for figure in ("pca.png", "probe_layers.png", "training.png", "rates.png", "safety_helpfulness.png"):
        assert (run_dir / "figures" / figure).stat().st_size > 1000
    text = (run_dir / "report.md").read_text()
    assert "(d) RBRM" in text and "![" in text and "Compute ratio online / RBRM" in text and "helpfulness*" in text
    measure = report["helpfulness_measure"]  # the measure's name and recorded agreement, printed beside its rates
    assert measure["name"] == "states-helpful" and f"on {measure['agreement']['accuracy']:.0%} of" in text
    assert "## Compute ledger" in text and "| FLOPs |" in text
    assert "unsafe, 2nd judge (minilm)" in text
    assert "Unsafe rate: judge `refusal`, whose agreement with careful labels is not on record" in text
    # degeneration figures: every method's top-opening share; the KL from base on the benign answers (0 for base)
    assert all(0 < row["opening_share"] <= 1 and row["opening"] is not None for row in methods.values())
    assert methods["base"]["benign_kl"] == 0.0
    assert all(methods[m]["benign_kl"] > 0 for m in ("dpo_static", "dpo_rerank", "rbrm", "online"))
    assert "| top opening | KL from base |" in text

    # Unchanged config: every stage is reused.
    before = stage_records(run_dir)
    capsys.readouterr()
    run(path)
    assert stage_records(run_dir) == before
    assert "running" not in capsys.readouterr().out

    # --report-only redraws the same report from the finished stages: the report only reads what they recorded.
    again = run(path, "--report-only")
    assert {k: v for k, v in again.items() if k != "date"} == {k: v for k, v in report.items() if k != "date"}
    assert stage_records(run_dir) == before

    # A changed evaluation setting reruns the evaluations only.
    run(tiny_config(tmp_path, tiny_model_dir, eval={"max_new_tokens": 3}))
    after = stage_records(run_dir)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {f"{m}/eval" for m in methods}


def test_online_samples_scored_by_an_external_reward_model(tmp_path, tiny_model_dir):
    """online.scorer: a local sequence-classification model (its logit ranks the samples, its FLOPs enter the
    ledger) or a judge."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rbrm.errors import RbrmError
    from rbrm.files import read_jsonl

    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_labels, config.pad_token_id = 1, 0
    classifier = tmp_path / "reward-model"
    LlamaForSequenceClassification(config).save_pretrained(classifier)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(classifier)
    for k, scorer in enumerate((str(classifier), "minilm")):
        out = tmp_path / f"runs-{k}"
        path = tiny_config(tmp_path, tiny_model_dir, methods=["base", "online"], out_dir=str(out),
                           online={"rounds": 2, "scorer": scorer})
        report = run(path)
        rank = read_jsonl(str(out / "tiny" / "online_rounds" / "round_0" / "pairs" / "rank.jsonl"))
        assert report["methods"]["online"]["flops"] > 0
        if scorer == str(classifier):  # the classifier's logit is the score
            from rbrm.rerank import ClassifierReward, Sample

            reward = ClassifierReward(str(classifier))
            again, _ = reward([Sample(r["prompt_id"], r["prompt"], r["response"], 0, 0) for r in rank])
            assert [r["score"] for r in rank] == pytest.approx(again, abs=1e-5)
            round_flops = json.loads((out / "tiny" / "online_rounds" / "round_0" / "stage.json").read_text())[
                "compute"]["flops"]
            assert round_flops > reward([Sample(r["prompt_id"], r["prompt"], r["response"], 0, 0) for r in rank])[1] > 0
        if scorer == "minilm":  # 1 - the judge's unsafe probability
            assert all(0.0 <= r["score"] <= 1.0 for r in rank) and len({r["score"] for r in rank}) > 1
    for scorer, message in (("no-such-scorer", "expected probe, a judge"), ("refusal", "no pairs")):
        with pytest.raises(RbrmError, match=message):  # the keyword judge ties every sample of these prompts
            run(tiny_config(tmp_path, tiny_model_dir, methods=["base", "online"], out_dir=str(tmp_path / scorer),
                            online={"rounds": 2, "scorer": scorer}))


def test_online_samples_the_prompts_its_updates_need_or_the_whole_pool(tmp_path, tiny_model_dir):
    """One update of one pair per round needs one prompt; `online.samples: all` samples the whole pool (4 training
    prompts once the evaluation prompts are dropped) every round, and the ledger counts it."""
    from rbrm.files import read_jsonl

    rows, flops = {}, {}
    for mode in ("updates", "all"):
        out = tmp_path / mode
        report = run(tiny_config(tmp_path, tiny_model_dir, methods=["base", "online"], out_dir=str(out),
                                 online={"rounds": 2, "samples": mode},
                                 dpo={"max_steps": 2, "per_device_train_batch_size": 1}))
        rows[mode] = [len(read_jsonl(str(out / "tiny" / "online_rounds" / f"round_{r}" / "samples.jsonl")))
                      for r in (0, 1)]
        flops[mode] = report["methods"]["online"]["compute_by_stage"]["online"]["construction_flops"]
    assert rows == {"updates": [2, 2], "all": [8, 8]}  # prompts x n 2
    assert flops["all"] > 1.5 * flops["updates"]


def test_the_matched_safety_compute_ratio_interpolates_onlines_curve():
    from rbrm.report import matched_compute_ratio

    def online(rounds, flops, unsafe):
        return {"method": "online", "rounds": rounds, "flops": flops, "construction_flops": flops / 2,
                "unsafe_rate": unsafe}
    curve = [online(1, 100.0, 0.5), online(2, 400.0, 0.3), online(4, 1600.0, 0.1)]
    rbrm = {"method": "rbrm", "rounds": None, "flops": 10.0, "construction_flops": 2.0, "unsafe_rate": 0.2}
    m = matched_compute_ratio(curve + [rbrm])
    # halfway from 0.3 to 0.1 in unsafe rate is halfway from 400 to 1600 in log FLOPs: 800
    assert m["online_flops"] == pytest.approx(800.0) and m["ratio"] == pytest.approx(80.0)
    assert m["construction_ratio"] == pytest.approx(400.0 / 2.0)
    never = matched_compute_ratio(curve + [{**rbrm, "unsafe_rate": 0.05}])
    assert never["ratio"] is None and "never reaches" in never["reason"] and "10.0% (4 rounds)" in never["reason"]
    cheap = matched_compute_ratio(curve + [{**rbrm, "unsafe_rate": 0.6}])
    assert cheap["ratio"] == pytest.approx(10.0) and "upper bound" in cheap["reason"]
    assert "noise" not in m["reason"]
    # as make compute measured it: more rounds sample at other times, not more, so the FLOPs hardly move
    flat = matched_compute_ratio([online(2, 400.0, 0.35), online(4, 401.0, 0.1), rbrm])
    assert flat["ratio"] == pytest.approx(40.04, rel=1e-3) and "differ by only 0%" in flat["reason"]


def test_the_compute_table_lists_online_by_rounds_and_comparisons_come_from_the_methods():
    from rbrm.methods import COMPARISONS, METHODS
    from rbrm.report import curve_section

    rows = [{"method": "online", "rounds": r, "flops": 4.45e13 - r, "unsafe_rate": 0.2} for r in (1, 2, 32, 4)]
    lines = curve_section({"compute_curve": rows, "matched_safety_compute_ratio": {"ratio": None, "reason": "x"}})
    assert [line.split(" | ")[1] for line in lines if line.startswith("| online")] == ["1", "2", "4", "32"]
    assert COMPARISONS[0] == ("rbrm", "base") and len(COMPARISONS) == 9
    assert all(a in METHODS and b in METHODS for a, b in COMPARISONS)


def test_the_online_curve_runs_each_number_of_rounds_on_the_main_runs_probe(tmp_path, tiny_model_dir):
    path = tiny_config(tmp_path, tiny_model_dir, methods=["base", "rbrm"], online_rounds=[1, 2])
    report = run(path)
    run_dir = tmp_path / "runs" / "tiny"
    rows = report["compute_curve"]
    assert [(r["method"], r["rounds"]) for r in rows] == [("online", 1), ("online", 2), ("rbrm", None)]
    assert rows[1]["flops"] > rows[0]["flops"] > 0  # every round samples and scores afresh
    assert all(0 < r["construction_flops"] < r["flops"] for r in rows)
    assert rows[0]["seven_b_scoring_flops"] > rows[0]["flops"]  # a 7B scorer costs more than this whole alignment
    assert "matched_safety_compute_ratio" in report and (run_dir / "figures" / "compute_curve.png").exists()
    for rounds in (1, 2):
        assert (run_dir / "curve" / f"online_r{rounds}" / "online" / "model").is_dir()
        assert not (run_dir / "curve" / f"online_r{rounds}" / "probe").exists()  # the main run's probe
    text = (run_dir / "report.md").read_text()
    assert "## Safety against compute" in text and "Matched-safety compute ratio online / RBRM" in text
    assert run(path, "--report-only")["compute_curve"] == rows
    # a stage written before the ledger counted FLOPs makes its method's FLOPs unknown, not zero
    record = json.loads((run_dir / "rbrm" / "stage.json").read_text())
    del record["compute"]["flops"]
    (run_dir / "rbrm" / "stage.json").write_text(json.dumps(record))
    report = run(path, "--report-only")
    assert report["methods"]["rbrm"]["flops"] is None and report["matched_safety_compute_ratio"]["ratio"] is None


def test_pipeline_sampling_resumes_after_a_kill(tmp_path, tiny_model_dir):
    """A killed sampling stage keeps its rows; the rerun completes them exactly as an uninterrupted run would."""
    from rbrm.files import read_jsonl

    path = tiny_config(tmp_path, tiny_model_dir, methods=["base", "dpo_rerank"])
    run(path)
    sample_dir = tmp_path / "runs" / "tiny" / "sample"
    rows = read_jsonl(str(sample_dir / "samples.jsonl"))
    rerank_record = (tmp_path / "runs" / "tiny" / "rerank" / "stage.json").read_text()
    os.remove(sample_dir / "stage.json")  # as if killed before the stage finished
    with open(sample_dir / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:3])
    run(path)
    assert read_jsonl(str(sample_dir / "samples.jsonl")) == rows
    assert (tmp_path / "runs" / "tiny" / "rerank" / "stage.json").read_text() == rerank_record


@pytest.mark.slow
def test_pipeline_smoke_on_smollm2(tmp_path, smollm2_path):
    """The real model, base vs RBRM, minutes-sized: every stage runs and the report holds both methods."""
    path = tiny_config(tmp_path, "smollm2-135m-instruct", methods=["base", "rbrm"],
                       probe={"limit": 24, "epochs": 30}, sample={"max_new_tokens": 16},
                       dpo={"max_steps": 2, "max_length": 96},
                       lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                       eval={"max_new_tokens": 16, "judge": "minilm"})
    report = run(path)
    rbrm = report["methods"]["rbrm"]
    assert rbrm["training"]["logged_steps"] == 2 and rbrm["forward_tokens"] > 0 and rbrm["generated_tokens"] > 0
    assert report["probe"]["val_pair_accuracy"] > 0.5
    assert set(report["methods"]) == {"base", "rbrm"}


def test_a_finding_says_whether_the_second_judge_agrees():
    from rbrm.report import _second_opinion

    safer = {"difference": -0.3, "ci": [-0.4, -0.2], "n": 50}
    unclear = {"difference": -0.02, "ci": [-0.1, 0.05], "n": 50}
    assert "holds under both judges" in _second_opinion(safer, safer, "refusal")
    text = _second_opinion(safer, unclear, "refusal")
    assert "does NOT hold under both judges" in text and "-2.0 points [-10.0, +5.0]" in text


def test_seeds_change_sampling_and_dpo_and_the_report_pools_them(tmp_path, tiny_model_dir):
    """Two seeds: different samples and different DPO runs; the same seed again: the same; one report over both
    with per-seed rates, their means, a verdict over seeds and prompts, and the seeds' audits pooled."""
    from rbrm.cli import main
    from rbrm.files import read_jsonl

    path = tiny_config(tmp_path, tiny_model_dir, methods=["base", "rbrm"], seeds=[0, 1])
    report = run(path)
    seeds_dir = tmp_path / "runs" / "tiny" / "seeds"
    samples = {s: (seeds_dir / f"seed{s}" / "sample" / "samples.jsonl").read_text() for s in (0, 1)}
    assert samples[0] != samples[1]
    logs = {s: json.loads((seeds_dir / f"seed{s}" / "rbrm" / "dpo_log.json").read_text()) for s in (0, 1)}
    assert [r.get("loss") for r in logs[0]] != [r.get("loss") for r in logs[1]]
    rows = report["methods"]["rbrm"]["seeds"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert report["methods"]["rbrm"]["unsafe_rate"] == pytest.approx(sum(r["unsafe_rate"] for r in rows) / 2)
    verdict = report["methods"]["rbrm"]["vs"]["base"]
    assert verdict["seeds"] == 2 and len(verdict["per_seed"]) == 2 and verdict["ci"][0] <= verdict["difference"]
    text = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "× 2 seeds" in text and "Where the time goes" in text and "| rbrm/eval |" in text
    assert "under both judges" in report["findings"][0] and "Helpfulness difference" in report["findings"][0]
    helped = report["methods"]["rbrm"]["helpfulness_vs"]["base"]
    assert helped["seeds"] == 2 and helped["n"] == 3  # the 3 XSTest safe prompts
    gain = report["against_base"]["rbrm"]["relative_safety_gain"]
    base, rbrm = report["methods"]["base"]["unsafe_rate"], report["methods"]["rbrm"]["unsafe_rate"]
    assert gain == pytest.approx(1 - rbrm / base) if base else True
    assert set(report["stage_seconds"]) == {"0", "1"} and report["stage_seconds"]["0"]["rbrm"] > 0
    assert (tmp_path / "runs" / "tiny" / "figures" / "safety_helpfulness_seeds.png").stat().st_size > 1000
    assert report["audit"] is None and "No seed's run has a human audit yet" in text
    # labels for seed 0's harmful answers: the report pools the audited seeds and says how many
    labelled = tmp_path / "labels.jsonl"
    with open(labelled, "w") as f:
        for method in ("base", "rbrm"):
            for r in read_jsonl(str(seeds_dir / "seed0" / method / "eval" / "advbench" / "responses.jsonl")):
                f.write(json.dumps({"prompt": r["prompt"], "response": r["response"], "unsafe": True}) + "\n")
    assert main(["audit", "--run", str(seeds_dir / "seed0"), "--import", str(labelled)]) == 0
    report = run(path)
    pooled = report["audit"]
    assert (pooled["seeds"], pooled["audited_seeds"]) == (2, 1)
    assert pooled["methods"]["rbrm"]["harmful"]["per_seed"] == [1.0] and "benign" not in pooled["methods"]["rbrm"]
    assert "## Human audit over seeds" in (tmp_path / "runs" / "tiny" / "report.md").read_text()
    # the same comparison across two runs (here: one run twice) gives the seeds report's verdict
    from rbrm.pipeline import Pipeline, seed_configs
    from rbrm.report import compare_across_runs
    from rbrm.run_config import load_config

    pipelines = []
    for seed_config in seed_configs(load_config(path)):
        pipelines.append(Pipeline(seed_config))
        pipelines[-1].load_records(["base", "rbrm"])
    views = [p.view() for p in pipelines]
    across = compare_across_runs(views, "rbrm", views, "base", resamples=50)
    assert across["unsafe"] == verdict and across["helpful"] == helped
    # the same seed in a separate run folder reproduces that seed's samples and training exactly
    again = tiny_config(tmp_path, tiny_model_dir, methods=["base", "rbrm"], out_dir=str(tmp_path / "again"))
    run(again)
    assert (tmp_path / "again" / "tiny" / "sample" / "samples.jsonl").read_text() == samples[0]
    assert [r.get("loss") for r in json.loads((tmp_path / "again" / "tiny" / "rbrm" / "dpo_log.json").read_text())] \
        == [r.get("loss") for r in logs[0]]


def test_seed_and_prompt_bootstrap_carries_seed_variance():
    from rbrm.report import seed_prompt_difference

    steady = seed_prompt_difference([[-1.0] * 50 + [0.0] * 50] * 3, resamples=500)
    spread = seed_prompt_difference([[-1.0] * 90 + [0.0] * 10, [-1.0] * 50 + [0.0] * 50, [-1.0] * 10 + [0.0] * 90],
                                    resamples=500)
    assert steady["difference"] == pytest.approx(-0.5) and spread["difference"] == pytest.approx(-0.5)
    width = lambda d: d["ci"][1] - d["ci"][0]  # noqa: E731
    assert width(spread) > 2 * width(steady)  # the same mean, but seeds that disagree widen the interval


def test_benign_pool_prompts_are_ranked_by_the_helpfulness_reward(tmp_path, tiny_model_dir):
    from rbrm.files import read_jsonl

    path = tiny_config(tmp_path, tiny_model_dir, methods=["base", "rbrm"],
                       sample={"benign_prompts": "data/refusal_direction/harmless_val.json", "benign_skip": 120,
                               "benign_limit": 3, "refusal_prefills": ["I'm sorry, but I can't", "I won't"]},
                       helpfulness_probe={"data": "data/rbrm_labels/derived_helpfulness_labelled.jsonl",
                                          "limit": 24, "baseline": False})
    report = run(path)
    run_dir = tmp_path / "runs" / "tiny"
    # one answer per refusal opening to every prompt, harmful and benign, ranked with the plain samples
    plain = read_jsonl(str(run_dir / "sample" / "samples.jsonl"))
    n = max(r["sample_index"] for r in plain) + 1
    ids = sorted({r["prompt_id"] for r in plain})
    assert any(i.startswith("benign:") for i in ids) and not all(i.startswith("benign:") for i in ids)
    for j, opening in enumerate(["I'm sorry, but I can't", "I won't"]):
        rows = read_jsonl(str(run_dir / "sample" / f"prefilled_{j}.jsonl"))
        assert sorted(r["prompt_id"] for r in rows) == ids
        assert all(r["response"].startswith(opening) and r["sample_index"] == n + j for r in rows)
    ranked = read_jsonl(str(run_dir / "rerank" / "rank.jsonl"))
    assert len(ranked) == len(plain) + 2 * len(ids)
    assert sum(bool(r.get("prefill")) for r in ranked) == 2 * len(ids)
    pairs = read_jsonl(str(run_dir / "rerank" / "pairs.jsonl"))
    kinds = {p["prompt_id"]: p["kind"] for p in pairs}
    assert {k for pid, k in kinds.items() if pid.startswith("benign:")} == {"benign"}
    assert {k for pid, k in kinds.items() if not pid.startswith("benign:")} == {"harmful"}
    summary = json.loads((run_dir / "rerank" / "summary.json").read_text())
    assert summary["benign_reward_model"].endswith(os.path.join("helpfulness_probe", "reward_model"))
    assert summary["chosen_prefilled"] == sum(p["chosen_index"] >= n for p in pairs)
    # the helpfulness reward is its own stage: the re-ranking reads it, and RBRM's compute counts it
    rerank_key = json.loads((run_dir / "rerank" / "key.json").read_text())["inputs"]
    helpfulness = json.loads((run_dir / "helpfulness_probe" / "stage.json").read_text())
    assert helpfulness["key"] in json.dumps(rerank_key)
    assert "helpfulness_probe" in report["methods"]["rbrm"]["compute_by_stage"]


def test_a_method_that_loses_helpfulness_is_flagged():
    from rbrm.report import helpfulness_cost, helpfulness_flags, mark_helpfulness

    methods = {"base": {"helpfulness_rate": 0.5}, "kept": {"helpfulness_rate": 0.45},
               "deflects": {"helpfulness_rate": 0.15, "opening": "i'm glad you're enjoying", "opening_share": 0.8,
                            "benign_kl": 1.234}}
    mark_helpfulness(methods)
    flags = helpfulness_flags(methods)
    assert methods["kept"]["helpfulness_flag"] is False and methods["kept"]["helpfulness_kept"] == pytest.approx(0.9)
    assert methods["deflects"]["helpfulness_flag"] is True and "helpfulness_flag" not in methods["base"]
    assert len(flags) == 1 and "FLAG: deflects keeps 30%" in flags[0] and "i'm glad you're enjoying" in flags[0]
    assert "80%" in flags[0] and "1.234" in flags[0]
    assert "keeps 30%" in helpfulness_cost(methods, "deflects") and helpfulness_cost(methods, "base") == ""


def test_the_helpfulness_flag_is_checked_against_the_audit():
    """The measure flags a method the audit finds helpful (the flag flips) and misses one the audit finds unhelpful
    (flagged by the audit); where the audit agrees it says so."""
    from rbrm.report import helpfulness_flags, mark_audited_helpfulness, mark_helpfulness

    methods = {"base": {"helpfulness_rate": 0.5}, "misread": {"helpfulness_rate": 0.2},
               "agreed": {"helpfulness_rate": 0.1}, "hidden": {"helpfulness_rate": 0.48}}

    def side(rate: float) -> dict:
        return {"benign": {"audit": {"rate": rate}, "ppi": {"rate": rate}}}

    audit = {"methods": {"base": side(0.6), "misread": side(0.54), "agreed": side(0.12), "hidden": side(0.3)}}
    mark_helpfulness(methods)
    mark_audited_helpfulness(methods, audit)
    flags = "\n".join(helpfulness_flags(methods))
    assert methods["misread"]["helpfulness_kept_audit"] == pytest.approx(0.9)
    assert "FLAG: misread keeps 40%" in flags and "keeps 90%; **the flag FLIPS under the audit**" in flags
    assert "FLAG: agreed keeps 20%" in flags and "keeps 20%; the flag holds" in flags
    assert "FLAG (human audit): hidden keeps 50%" in flags and "measure says 96%" in flags
    assert "base" not in {k for k, v in methods.items() if "helpfulness_kept_audit" in v}
    mark_audited_helpfulness(methods := {"base": {"helpfulness_rate": 0.5}}, None)  # no audit: nothing added
    assert methods == {"base": {"helpfulness_rate": 0.5}}


def test_a_new_baseline_is_one_method_and_its_stages_safedpo(tmp_path, tiny_model_dir):
    """SafeDPO came in as one Method plus its own stages: its pairs carry SafeDPO's margin, its DPO key holds Delta,
    and the report (untouched) gives it a row, a finding against the base model and RBRM's finding against it."""
    from rbrm.files import read_jsonl

    path = tiny_config(tmp_path, tiny_model_dir, methods=["base", "dpo_rerank", "rbrm", "safedpo"],
                       safedpo={"data": "data/xstest/derived_unsafe_prompt_pairs_pku_format.jsonl", "limit": 6,
                                "margin": 5.0})
    report = run(path)
    run_dir = tmp_path / "runs" / "tiny"
    pairs = read_jsonl(str(run_dir / "safety_pairs" / "pairs.jsonl"))
    assert len(pairs) == 6 and all(p["safety_margin"] == 1.0 for p in pairs)  # XSTest: one safe, one unsafe answer
    record = json.loads((run_dir / "safedpo" / "stage.json").read_text())
    assert record["inputs"]["safety_margin"] == 5.0 and record["compute"]["pairs"] == 6
    logged = json.loads((run_dir / "safedpo" / "dpo_log.json").read_text())
    assert any("safedpo/margin_pairs" in row for row in logged)  # the trainer saw the margin column
    row = report["methods"]["safedpo"]
    assert row["compute_by_stage"]["safety_pairs"]["pairs"] == 6 and row["unsafe_rate"] is not None
    assert "base" in row["vs"] and "safedpo" in report["methods"]["rbrm"]["vs"]
    # a bad margin fails before any stage runs
    from rbrm.run_config import PipelineConfigError, load_config

    with pytest.raises(PipelineConfigError, match="`safedpo.margin` must be a number >= 0"):
        load_config(tiny_config(tmp_path, tiny_model_dir, methods=["base", "safedpo"],
                                safedpo={"data": "x.jsonl", "margin": -1.0}))
