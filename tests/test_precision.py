"""The CPU precision `auto` picks: measured (the faster wins), cached per machine, forced by flag or variable."""

from __future__ import annotations

import pytest
import torch

import rbrm.machine
import rbrm.precision
from rbrm.commands import parse_config
from rbrm.commands.dpo import DPOCommandConfig
from rbrm.dpo import ConfidenceDPOConfig
from rbrm.errors import ConfigError
from rbrm.machine import machine, machine_summary
from rbrm.models import resolve_dtype
from rbrm.precision import cpu_precision, matmul_gflops

XEON = {"cpu": "Intel(R) Xeon(R) test", "flags": ["avx2", "avx512_bf16", "avx512f"]}


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """A CPU with AVX512-BF16, an empty cache, and a measurement that returns `speeds` and counts its calls."""
    monkeypatch.setenv("RBRM_CACHE", str(tmp_path))
    monkeypatch.delenv("RBRM_CPU_PRECISION", raising=False)
    monkeypatch.setattr(rbrm.precision, "cpu_identity", lambda: dict(XEON))
    speeds = {"fp32": 364.0, "bf16": 198.0}
    calls = []

    def measure(dtype):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        calls.append(name)
        return {"all": speeds[name]}

    monkeypatch.setattr(rbrm.precision, "matmul_gflops", measure)
    return speeds, calls


@pytest.mark.parametrize("fp32, bf16, choice", [(364.0, 198.0, "fp32"), (300.0, 974.0, "bf16")])
def test_the_faster_precision_wins(fake_cpu, fp32, bf16, choice):
    speeds, calls = fake_cpu
    speeds.update(fp32=fp32, bf16=bf16)
    result = cpu_precision()
    assert result["choice"] == choice and result["source"] == "measured"
    assert sorted(calls) == ["bf16", "fp32"]
    assert result["gflops"] == {"fp32": {"all": fp32}, "bf16": {"all": bf16}}
    expected = torch.bfloat16 if choice == "bf16" else torch.float32
    assert resolve_dtype("auto", "cpu", inference=True) == expected
    assert resolve_dtype("auto", "cpu", inference=False) == torch.float32  # trainable copies stay fp32


def test_bf16_must_be_clearly_faster(fake_cpu):
    """Within the noise margin fp32 stays: it rounds less, and a flip would change the stage keys."""
    speeds, _ = fake_cpu
    speeds.update(fp32=300.0, bf16=310.0)
    assert cpu_precision()["choice"] == "fp32"


def test_the_cache_is_read_back_instead_of_measuring_again(fake_cpu, tmp_path, monkeypatch):
    speeds, calls = fake_cpu
    speeds.update(fp32=300.0, bf16=974.0)
    assert cpu_precision()["choice"] == "bf16"
    assert len(calls) == 2 and (tmp_path / "cpu_precision.json").is_file()
    speeds.update(fp32=974.0, bf16=300.0)  # would flip the choice if measured again
    again = cpu_precision()
    assert again["choice"] == "bf16" and again["source"] == "cached" and len(calls) == 2
    assert again["gflops"]["bf16"]["all"] == 974.0
    # another thread count (or CPU, or torch) is another machine: measured again, the first entry kept
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert cpu_precision()["choice"] == "fp32" and len(calls) == 4
    finally:
        torch.set_num_threads(threads)
    assert cpu_precision()["source"] == "cached" and cpu_precision()["choice"] == "bf16" and len(calls) == 4


def test_an_unreadable_cache_is_measured_again(fake_cpu, tmp_path):
    _, calls = fake_cpu
    (tmp_path / "cpu_precision.json").write_text("{not json")
    assert cpu_precision()["source"] == "measured" and len(calls) == 2
    assert cpu_precision()["source"] == "cached"


def test_an_unwritable_cache_still_gives_the_choice(fake_cpu, tmp_path, monkeypatch):
    speeds, calls = fake_cpu
    speeds.update(fp32=300.0, bf16=974.0)
    monkeypatch.setenv("RBRM_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")
    assert cpu_precision()["choice"] == "bf16" and len(calls) == 2


def test_without_bf16_instructions_fp32_without_timing(fake_cpu, monkeypatch):
    speeds, calls = fake_cpu
    speeds.update(fp32=1.0, bf16=1000.0)
    monkeypatch.setattr(rbrm.precision, "cpu_identity", lambda: {"cpu": "AMD EPYC", "flags": ["avx2", "fma"]})
    result = cpu_precision()
    assert result == {"choice": "fp32", "source": "no bf16 instructions"} and calls == []
    assert resolve_dtype("auto", "cpu", inference=True) == torch.float32


def test_the_variable_and_the_flags_override(fake_cpu, monkeypatch):
    speeds, calls = fake_cpu
    speeds.update(fp32=300.0, bf16=974.0)
    monkeypatch.setenv("RBRM_CPU_PRECISION", "fp32")
    assert cpu_precision() == {"choice": "fp32", "source": "RBRM_CPU_PRECISION"} and calls == []
    assert resolve_dtype("auto", "cpu", inference=True) == torch.float32
    monkeypatch.setenv("RBRM_CPU_PRECISION", "bf16")
    assert resolve_dtype("auto", "cpu", inference=True) == torch.bfloat16
    monkeypatch.setenv("RBRM_CPU_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="RBRM_CPU_PRECISION"):
        cpu_precision()
    monkeypatch.delenv("RBRM_CPU_PRECISION")
    # an explicit --dtype is never measured
    assert resolve_dtype("float32", "cpu", inference=True) == torch.float32
    assert resolve_dtype("bfloat16", "cpu", inference=True) == torch.bfloat16
    assert calls == []
    assert resolve_dtype("auto", "cuda", inference=True) == torch.bfloat16 and calls == []


def test_rbrm_dpo_defaults_follow_the_measurement(fake_cpu, monkeypatch):
    speeds, _ = fake_cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DPOCommandConfig.cli_defaults()["bf16"] is False  # the Xeon without AMX: bf16 is slower
    monkeypatch.setenv("RBRM_CPU_PRECISION", "bf16")
    assert DPOCommandConfig.cli_defaults()["bf16"] is True
    _, args = parse_config([DPOCommandConfig, ConfidenceDPOConfig],
                           ["--pairs", "p", "--output_dir", "d", "--bf16", "false"], prog="rbrm dpo")
    assert args.bf16 is False and args.use_cpu  # the flag wins over the measured default


def test_machine_records_the_choice_and_the_speeds(fake_cpu, monkeypatch):
    speeds, _ = fake_cpu
    monkeypatch.setattr(rbrm.machine, "cpu_identity", lambda: dict(XEON))
    info = machine()
    assert info["cpu"] == XEON["cpu"] and "avx512_bf16" in info["cpu_flags"]
    assert info["cpu_precision"]["choice"] == "fp32"
    assert info["cpu_precision"]["gflops"]["bf16"]["all"] == speeds["bf16"]
    assert "CPU precision fp32 (measured: fp32 364, bf16 198 GFLOP/s)" in machine_summary(info)


def test_the_real_measurement_is_short_and_positive():
    """The calibration itself, on whatever CPU runs the tests, small shapes: GFLOP/s per shape and over all."""
    result = matmul_gflops(torch.float32, shapes=((64, 96, 128), (128, 128, 128)), repeats=2)
    assert set(result) == {"64x96x128", "128x128x128", "all"}
    assert all(v > 0 for v in result.values())
    shapes = (result["64x96x128"], result["128x128x128"])  # "all" is their FLOP-weighted harmonic mean
    assert min(shapes) * 0.999 <= result["all"] <= max(shapes) * 1.001  # 4 significant digits kept
