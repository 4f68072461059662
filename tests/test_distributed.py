"""`rbrm pipeline` under a launcher: two CPU processes (torchrun, gloo) give the one-process run's results.

Tolerance, stated once: with one thread per process in both runs (torchrun's default), the stage keys, the sampled
and generated texts, the pairs (scores included) and every judged rate are equal; the trained weights agree within
WEIGHT_ATOL (DDP averages the two processes' gradients, which rounds differently from one process's mean over the
same batch). With another thread count the features round differently (about 1e-7 relative), so the pairs file,
and the keys of the stages that hash it, differ.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from safetensors.torch import load_file

from rbrm import distributed
from rbrm.cli import run_command
from rbrm.files import read_jsonl
from rbrm.run_config import PipelineConfigError, load_config
from tests.test_pipeline import stage_records, tiny_config

WEIGHT_ATOL = 1e-4
METHODS = ["base", "rbrm", "online"]  # sampling, re-ranking, DPO with the probe learning, online rounds, evaluation


def test_one_process_is_the_plain_path():
    """Without a launcher every collective is the identity and every batch is this process's."""
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    with distributed.data_parallel():
        assert not distributed.splitting()
        assert all(distributed.my_turn(i) for i in range(5))
        assert distributed.gather({"a": 1}) == [{"a": 1}]
        t = torch.arange(6.0).reshape(3, 2)
        assert distributed.sum_tensor(t) is t
    assert distributed.sum_numbers(2, 3.5) == [2, 3.5]
    assert distributed.broadcast("x") == "x"


def test_launch_settings_are_checked_before_any_stage(tmp_path):
    bad = [({"launcher": "mpirun", "processes": 2}, "launch.launcher"),
           ({"launcher": "torchrun", "processes": 0}, "launch.processes"),
           ({"launcher": "torchrun", "processes": 3}, "split evenly over `launch.processes`"),
           ({"processes": 2}, "needs `launch.launcher`"),
           ({"launcher": "torchrun", "accelerate_config": "x.yaml"}, "launch.accelerate_config")]
    for launch, message in bad:
        path = tiny_config(tmp_path, "unused", launch=launch)
        with pytest.raises(PipelineConfigError, match=message.replace("`", ".").replace(".", ".")):
            load_config(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_two_processes_give_the_one_process_run(tmp_path, tiny_model_dir, monkeypatch):
    """~1 min on an idle 2-core machine: the tiny pipeline once in this process and once as two processes."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # float32 on every CPU: where the calibration picks bf16 (AMX), the all-reduce's float noise in the DPO weights
    # grows to other sampled tokens in the online round, on either side, which says nothing about the split
    monkeypatch.setenv("RBRM_CPU_PRECISION", "fp32")
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        launch = {"launcher": "torchrun", "processes": processes}
        # One prompt per generate call and small feature batches, so that every split loop has several turns.
        path = tiny_config(out, tiny_model_dir, methods=METHODS, launch=launch, sample={"batch_prompts": 1},
                           rerank={"batch_tokens": 64}, eval={"batch_prompts": 1})
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each of torchrun's processes runs (OMP_NUM_THREADS=1)
        try:
            assert run_command(("pipeline",), ["--config", path, "--device", "cpu"]) == 0
        finally:
            torch.set_num_threads(threads)
        runs[processes] = out / "runs" / "tiny"
    one, two = runs[1], runs[2]

    # the same stage keys: a launcher is not a setting of any stage
    keys = {p: {k: json.loads(v)["key"] for k, v in stage_records(d).items()} for p, d in runs.items()}
    assert keys[1] == keys[2] and "rbrm" in keys[1] and "online_rounds/round_1" in keys[1]

    for name in ("sample/samples.jsonl", "rerank/pairs.jsonl", "online_rounds/round_1/samples.jsonl"):
        texts = [[(r["prompt_id"], r.get("sample_index"), r.get("response") or r.get("chosen"))
                  for r in read_jsonl(str(d / name))] for d in (one, two)]
        assert texts[0] == texts[1], name

    probes = [load_file(str(d / "probe" / "reward_model" / "reward_model.safetensors")) for d in (one, two)]
    assert probes[0].keys() == probes[1].keys() and all(torch.equal(probes[0][k], probes[1][k]) for k in probes[0])

    for method in ("rbrm", "online"):
        a, b = weights(one / method / "model"), weights(two / method / "model")
        base = weights(tiny_model_dir)
        assert any(not torch.equal(a[k], base[k]) for k in a), f"{method} did not train"
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= WEIGHT_ATOL, f"{method}: weights differ by {worst}"

    reports = [json.loads((d / "report.json").read_text()) for d in (one, two)]
    for method in METHODS:
        rates = [{k: v for k, v in r["methods"][method].items() if k.endswith("_rate")} for r in reports]
        assert rates[0] and rates[0] == rates[1], method
    for d in (one, two):
        answers = read_jsonl(str(d / "rbrm" / "eval" / "advbench" / "responses.jsonl"))
        assert len(answers) == 3
    assert [r["response"] for r in read_jsonl(str(one / "rbrm" / "eval" / "advbench" / "responses.jsonl"))] == \
        [r["response"] for r in read_jsonl(str(two / "rbrm" / "eval" / "advbench" / "responses.jsonl"))]
    # the compute ledger counts every process's work once
    records = {p: {k: json.loads(v)["compute"] for k, v in stage_records(d).items()} for p, d in runs.items()}
    assert records[1]["rbrm"]["steps"] == records[2]["rbrm"]["steps"] == 4
    for stage in ("probe", "sample", "rerank", "rbrm", "online_rounds/round_0", "rbrm/eval"):
        for counter in ("generated_tokens", "forward_tokens", "flops"):
            assert records[1][stage].get(counter) == records[2][stage].get(counter), (stage, counter)


def test_the_command_relaunches_itself_under_the_named_launcher(tmp_path, monkeypatch):
    from rbrm.commands.pipeline import LAUNCHED_BY_RBRM, PipelineCommandConfig, launcher_command, run_pipeline

    path = tiny_config(tmp_path, "unused")
    config = load_config(path, {"set": ["launch.launcher=torchrun", "launch.processes=2"]})
    assert (config.launch.launcher, config.launch.processes) == ("torchrun", 2)
    args = PipelineCommandConfig(config=path, methods=["base", "rbrm"], set=["eval.max_new_tokens=3"])
    command = launcher_command(args, config.launch)
    assert command[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    assert command[7:] == ["rbrm.cli", "pipeline", "--config", path, "--methods", "base", "rbrm",
                           "--set", "eval.max_new_tokens=3"]
    accelerate = launcher_command(args, type(config.launch)("accelerate", 4, "zero2.yaml"))
    assert accelerate[1:7] == ["-m", "accelerate.commands.launch", "--config_file", "zero2.yaml", "--num_processes", "4"]

    # A launcher that starts one plain process must not make it launch again (a fork bomb): a clear error instead.
    monkeypatch.setenv(LAUNCHED_BY_RBRM, "1")
    args = PipelineCommandConfig(config=path, set=["launch.launcher=torchrun", "launch.processes=2"])
    with pytest.raises(PipelineConfigError, match="started this process alone"):
        run_pipeline(args)
