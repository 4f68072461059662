"""Sample N responses per prompt from the policy (docs/method.md §3), batched and resumable.

Work is cut into a fixed plan of generate calls (many prompts x N each, left-padded). Each call draws its
randomness from a seed derived from (seed, the prompt ids and sample indices in the call) only, so a call
gives the same rows whether it runs first, last, or again after a kill. Rows are appended (and fsynced)
after every call; a rerun skips the (prompt_id, sample_index) keys already in the file and regenerates a
half-written call in full, keeping only its missing rows. A sidecar `<out>.meta.json` records the settings
that produced the file, and a rerun with other settings is refused instead of mixing two distributions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .distributed import barrier, gather, is_main, my_turn, split_ways, splitting
from .errors import ConfigError, DataError, RbrmError
from .features import context_length, pad
from .files import append_jsonl, digest, exclusive_writer, read_json_file, read_jsonl, write_json
from .flops import ModelShape, generation_flops
from .formats import prompt_records
from .layout import sample_files
from .models import model_fingerprint
from .render import end_of_turn, prompt_length, render_prompt

log = logging.getLogger(__name__)

META_SUFFIX = ".meta.json"
META_FORMAT = "rbrm-samples/1"

# (response text, finish reason "stop" | "length", generated tokens incl. the stop token)
Generated = tuple[str, str, int]
# (rendered prompt texts, samples wanted per prompt, seed) -> each prompt's samples, in order
Backend = Callable[[list[str], list[int], int], list[list[Generated]]]


class SamplingSettingsError(RbrmError, ValueError):
    """The output file was produced with other settings; appending would mix two sampling distributions."""


@dataclass(frozen=True)
class DecodingConfig:
    """Decoding settings; the defaults are the paper's sampling settings."""

    do_sample: bool = True
    temperature: float = 1.4
    top_k: int = 8
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    max_new_tokens: int = 256
    min_new_tokens: int = 0

    @classmethod
    def greedy(cls, max_new_tokens: int = 256, repetition_penalty: float = 1.0) -> DecodingConfig:
        """Evaluation-style decoding: argmax at every step."""
        return cls(do_sample=False, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens)

    def effective(self) -> dict:
        """The settings that change the output (sampling knobs are moot when greedy)."""
        values = asdict(self)
        if not self.do_sample:
            values.update(temperature=None, top_k=None, top_p=None)
        return values


# ------------------------------------------------------------------------------------- HF backend


def stop_token_ids(tokenizer, generation_eos: int | list[int] | None = None) -> list[int]:
    """Ids that end a response: the generation config's EOS ids, the tokenizer's EOS, the end-of-turn token.

    Chat models often end a turn with a token that is not `eos_token` (e.g. Llama 3's `<|eot_id|>`).
    """
    ids: list[int] = []
    for value in (generation_eos, tokenizer.eos_token_id):
        if value is not None:
            ids += value if isinstance(value, list) else [value]
    marker = tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    if len(marker) == 1:
        ids += marker
    return sorted(set(ids))


def split_generated(tokens: list[int], stop_ids: set[int], tokenizer) -> Generated:
    """Cut a generated row at its first stop token; what follows is padding."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokenizer.decode(tokens[:i], skip_special_tokens=True), "stop", i + 1
    return tokenizer.decode(tokens, skip_special_tokens=True), "length", len(tokens)


class TopKSampler(LogitsProcessor):
    """Temperature, top-k, top-p and the draw over the k best tokens only; returns a one-hot score row.

    Why: transformers' warpers sort the whole vocabulary and `multinomial` draws over all of it at every
    step, which took about half of batched sampling time on CPU (49k tokens per row). Within the top k the
    probabilities are the same (ties at the k-th score aside), so `generate` runs greedy and takes the
    drawn token. Runs after the library's processors (repetition penalty, min_new_tokens).
    """

    def __init__(self, temperature: float, top_k: int, top_p: float):
        if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"need temperature > 0, top_k >= 0 (0: all tokens) and 0 < top_p <= 1; "
                              f"got {temperature}, {top_k}, {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def probabilities(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities [B, k], token ids [B, k]) of the candidates, as transformers' warpers give them."""
        k = min(self.top_k, scores.shape[-1]) if self.top_k else scores.shape[-1]
        values, indices = torch.topk(scores.float() / self.temperature, k, dim=-1)
        probs = values.softmax(-1)
        ascending = probs.flip(-1)  # transformers' top-p: drop the smallest whose mass is <= 1 - top_p
        drop = ascending.cumsum(-1) <= 1 - self.top_p
        drop[..., -1] = False
        probs = probs.masked_fill(drop.flip(-1), 0.0)
        return probs / probs.sum(-1, keepdim=True), indices

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs, indices = self.probabilities(scores)
        chosen = indices.gather(-1, torch.multinomial(probs, 1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)


@contextlib.contextmanager
def contiguous_head_input(model):
    """Hands the output head a contiguous input while generating.

    `generate` computes logits for the last position only, a strided slice of the hidden states. PyTorch's CPU
    matmul folds such a 3-d input into one matrix product only if the weight requires grad; for a frozen bf16
    head (a merged or PEFT-loaded policy) it runs a batched product that first copies the head once per
    sequence (pytorch/pytorch#151934): 1.07 s instead of 0.008 s per step for SmolLM2's head at 16 sequences,
    and online round 1 sampled at 98 instead of 266 tokens/s. The copy of the slice costs one hidden vector.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def hf_backend(model, tokenizer, settings: DecodingConfig) -> Backend:
    """Batched `model.generate`: every prompt of a call repeated for its samples, left-padded, one call."""
    stops = stop_token_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # A fresh config, so the model's own generation defaults (e.g. a hub temperature) never leak in.
    # Sampling draws in TopKSampler; the library then decodes greedily over its one-hot scores.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens or None, repetition_penalty=settings.repetition_penalty,
        eos_token_id=stops, pad_token_id=pad_id)
    processors = LogitsProcessorList(
        [TopKSampler(settings.temperature, settings.top_k, settings.top_p)] if settings.do_sample else [])
    device = next(model.parameters()).device
    stop_set = set(stops)

    def run(texts: list[str], counts: list[int], seed: int) -> list[list[Generated]]:
        prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        ids, mask = pad([p for p, c in zip(prompt_ids, counts) for _ in range(c)], pad_id, device, side="left")
        rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode(), contiguous_head_input(model):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 logits_processor=processors)
        rows = [split_generated(row, stop_set, tokenizer) for row in out[:, ids.shape[1]:].tolist()]
        grouped, start = [], 0
        for c in counts:
            grouped.append(rows[start:start + c])
            start += c
        return grouped

    return run


# ----------------------------------------------------------------------------------- vLLM backend


def vllm_backend(model_path: str, tokenizer, settings: DecodingConfig, dtype: str = "auto") -> Backend:
    """vLLM generation (GPU only); same rows as the HF backend, not the same samples for a given seed."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ConfigError("--engine vllm needs the `vllm` package (pip install vllm); use --engine hf") from None
    if not torch.cuda.is_available():
        raise ConfigError("--engine vllm needs a CUDA GPU; none is visible here. Use --engine hf")

    try:
        generation_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        generation_eos = None
    stop_ids = stop_token_ids(tokenizer, generation_eos)
    llm = LLM(model=model_path, dtype=dtype, seed=0)

    def run(texts: list[str], counts: list[int], seed: int) -> list[list[Generated]]:
        requests = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
        knobs = (dict(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
                 if settings.do_sample else dict(temperature=0.0))
        params = [SamplingParams(n=c, repetition_penalty=settings.repetition_penalty,
                                 max_tokens=settings.max_new_tokens, min_tokens=settings.min_new_tokens,
                                 stop_token_ids=stop_ids, seed=seed + i, **knobs)
                  for i, c in enumerate(counts)]
        outputs = llm.generate(requests, params, use_tqdm=False)
        return [[(o.text, "stop" if o.finish_reason == "stop" else "length", len(o.token_ids))
                 for o in out.outputs] for out in outputs]

    return run


# ----------------------------------------------------------------------------------- the run loop


def plan_calls(num_prompts: int, n: int, batch_prompts: int, max_sequences: int) -> list[list[tuple[int, range]]]:
    """Fixed plan of generate calls: each a list of (prompt position, sample indices).

    At most `batch_prompts` prompts and `max_sequences` sequences per call; a prompt whose N exceeds the cap
    is split over calls. The plan depends on the arguments only, which is what makes resume exact.
    """
    if n < 1 or batch_prompts < 1 or max_sequences < 1:
        raise ValueError("n, batch_prompts and max_sequences must be >= 1")
    chunk = min(n, max_sequences)
    items = [(p, range(s, min(s + chunk, n))) for p in range(num_prompts) for s in range(0, n, chunk)]
    calls: list[list[tuple[int, range]]] = []
    current: list[tuple[int, range]] = []
    for item in items:
        prompts_in = len({p for p, _ in current} | {item[0]})
        if current and (prompts_in > batch_prompts or sum(len(r) for _, r in current) + len(item[1]) > max_sequences):
            calls.append(current)
            current = []
        current.append(item)
    if current:
        calls.append(current)
    return calls


def call_seed(seed: int, keys: list[tuple[str, int, int]]) -> int:
    """A seed that depends only on the run's seed and what the call generates (not on what ran before).

    From the raw SHA-256 bytes, not `files.digest`'s hex: a seed, not an identity, and pinned by the samples it
    drew."""
    digest = hashlib.sha256(json.dumps([seed, keys]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def weights_digest(model) -> str:
    """A cheap hash over a strided sample of every parameter: tells a fine-tuned model from its base."""
    parts = []
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        parts += [name.encode() + str(tuple(param.shape)).encode(), flat[::step][:256].float().cpu().numpy().tobytes()]
    return digest(b"".join(parts))


def model_identity(model) -> dict:
    """What the sidecar records about the generator: a fingerprint for a loaded model, else its name."""
    if isinstance(model, torch.nn.Module):
        return {**model_fingerprint(model), "weights_sha256": weights_digest(model),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return {"name": str(model)}


def _comparable(key: str, value):
    """A loaded model is identified by its weights, not by the folder it was loaded from."""
    if key == "model" and isinstance(value, dict) and "weights_sha256" in value:
        return {k: v for k, v in value.items() if k != "name"}
    return value


def _check_meta(out_path: str, meta: dict) -> None:
    """Refuse to append to a file made with other settings; warn if only the batch layout changed."""
    meta_path = out_path + META_SUFFIX
    if not os.path.exists(meta_path):
        if os.path.exists(out_path) and os.path.getsize(out_path):
            raise SamplingSettingsError(
                f"{out_path} already has rows but no {os.path.basename(meta_path)}: cannot tell which settings "
                "produced them. Write to a new file, or delete this one to start over.")
        write_json(meta_path, meta)
        return
    old = read_json_file(meta_path)
    identity = ("format", "engine", "model", "settings", "n", "seed", "prefill", "first_index")
    diffs = [f"  {key}: file has {old.get(key)!r}, this run has {meta.get(key)!r}"
             for key in identity if _comparable(key, old.get(key)) != _comparable(key, meta.get(key))]
    if diffs:
        raise SamplingSettingsError(
            f"{out_path} was generated with other settings (see {meta_path}):\n" + "\n".join(diffs)
            + "\nUse the same settings to resume, or write to a new --out file.")
    if old.get("layout") != meta["layout"]:
        warnings.warn(f"{out_path}: resuming with another batch layout ({old.get('layout')} -> {meta['layout']}); "
                      "new rows are valid samples but differ from those of an uninterrupted run", stacklevel=3)


def _existing_rows(out_path: str, prompts_by_id: dict) -> dict[tuple[str, int], dict]:
    if not os.path.exists(out_path):
        return {}
    done: dict[tuple[str, int], dict] = {}
    duplicates = 0
    for line, row in enumerate(read_jsonl(out_path), 1):
        for key in ("prompt_id", "sample_index", "prompt", "response"):
            if key not in row:
                raise DataError(out_path, line, key, "missing: not a samples file written by `rbrm sample`")
        key = (str(row["prompt_id"]), int(row["sample_index"]))
        record = prompts_by_id.get(key[0])
        if record is not None and row["prompt"] != record.prompt:
            raise SamplingSettingsError(
                f"{out_path}:{line}: prompt id {key[0]!r} holds another prompt than the prompts file gives it; "
                "the prompts changed since this file was written. Write to a new --out file.")
        if key in done:
            duplicates += 1
            continue
        done[key] = row
    if duplicates:
        log.warning("%s: ignoring %d duplicate (prompt_id, sample_index) rows", out_path, duplicates)
    return done


def generate_responses(model, tokenizer, prompts: list, n: int = 8, settings: DecodingConfig | None = None,
                       out_path: str | None = None, batch_prompts: int = 8, seed: int = 0, progress: bool = True,
                       max_sequences: int = 64, backend: Backend | None = None, engine: str = "hf",
                       stats: dict | None = None, prefill: str = "", first_index: int = 0) -> list[dict]:
    """N responses per prompt (PromptRecords, or bare prompts numbered by position); rows in prompt order, then
    sample index.

    `prefill` opens every answer with fixed text that the model then continues (the response includes it; rows
    say `prefill`): how a policy that never refuses is given refusals to rank. Rows are numbered from
    `first_index`, so such rows can join a prompt's plain samples without clashing.

    With `out_path`, rows are appended as each call finishes and rows already there are kept (resume).
    `model` may be a model name when a `backend` that loads its own model (vLLM) is given.
    `stats`, if given, receives generated_tokens, seconds and calls of this run (not of earlier runs).
    """
    prompts = prompt_records(prompts)
    with exclusive_writer(out_path) if out_path and is_main() else contextlib.nullcontext():
        return _generate_responses(model, tokenizer, prompts, n, settings, out_path, batch_prompts, seed,
                                   progress, max_sequences, backend, engine, stats, prefill, first_index)


def sample_counted(model, tokenizer, prompts: list, out_path: str, section, seed: int, n: int | None = None,
                   prefill: str = "", first_index: int = 0) -> dict:
    """`n` responses per prompt into `out_path` (resumable) with the sample section's settings (`n`, decoding,
    batching), and their exact compute over the whole file: generated tokens, prompt tokens, FLOPs."""
    n = section.n if n is None else n
    rows = generate_responses(model, tokenizer, prompts, n, section.generation_settings(), out_path,
                              section.batch_prompts, seed, max_sequences=section.max_sequences, prefill=prefill,
                              first_index=first_index)
    sampled = {r["prompt_id"] for r in rows}  # prompts too long for the context were skipped, not prefilled
    forced = len(tokenizer(prefill, add_special_tokens=False)["input_ids"]) if prefill else 0
    length = {str(p.id): prompt_length(tokenizer, p.prompt) + forced for p in prompts if str(p.id) in sampled}
    shape = ModelShape.of(model)
    return {"generated_tokens": sum(int(r["num_tokens"]) for r in rows), "forward_tokens": sum(length.values()) * n,
            "flops": sum(generation_flops(shape, length[str(r["prompt_id"])], int(r["num_tokens"])) for r in rows),
            "responses": len(rows)}


def sample_candidates(model, tokenizer, prompts: list, directory: str, section, seed: int) -> dict:
    """The candidates re-ranking orders (`rbrm.layout.sample_files`): `section.n` samples per prompt, then one
    answer per refusal opening (`section.refusal_prefills`) to every prompt. On a harmful prompt the safety
    reward may choose the refusal; on a benign one the helpfulness reward ranks it low, so the pair teaches not
    to refuse there. `section` is the run's `sample` settings; returns the summed compute."""
    openings = section.refusal_prefills or []
    files = sample_files(directory, len(openings))
    compute = sample_counted(model, tokenizer, prompts, files[0], section, seed)
    for j, (text, path) in enumerate(zip(openings, files[1:])):
        more = sample_counted(model, tokenizer, prompts, path, section, seed + 1 + j, n=1, prefill=text,
                              first_index=section.n + j)
        compute = {k: v + more[k] for k, v in compute.items()}
    return compute


def drop_too_long(prompts: list, texts: list[str], tokenizer, limit: int | None, max_new_tokens: int):
    """(kept prompts, kept texts, dropped prompts): a prompt whose tokens plus `max_new_tokens` exceed the
    model's context window would be generated past what the model was trained on (garbage)."""
    if limit is None:
        return prompts, texts, []
    kept, kept_texts, dropped = [], [], []
    for p, t in zip(prompts, texts):
        if len(tokenizer(t, add_special_tokens=False)["input_ids"]) + max_new_tokens > limit:
            dropped.append(p)
        else:
            kept.append(p)
            kept_texts.append(t)
    if dropped:
        where = ", ".join(getattr(p, "source", "") or str(p.id) for p in dropped[:5])
        log.warning("skipping %d prompt(s) whose tokens + max_new_tokens=%d exceed the model's context of %d "
                    "tokens: %s%s", len(dropped), max_new_tokens, limit, where, " ..." if len(dropped) > 5 else "")
    return kept, kept_texts, dropped


def _run_call(backend: Backend, call: list[tuple[int, range]], ids: list[str], texts: list[str], prompts: list,
              seed: int, done: dict, prefill: str, first_index: int) -> tuple[list[dict], int]:
    """One planned generate call: (its rows not yet in `done`, the tokens it generated)."""
    seed_here = call_seed(seed, [(ids[p], r.start, r.stop) for p, r in call])
    results = backend([texts[p] for p, _ in call], [len(r) for _, r in call], seed_here)
    made = {(p, i): out for (p, r), outs in zip(call, results) for i, out in zip(r, outs)}
    rows = []
    for p, i in [(p, i) for p, r in call for i in r if (ids[p], i) not in done]:
        response, finish, num_tokens = made[(p, i)]
        row = {"prompt_id": ids[p], "sample_index": first_index + i, "prompt": prompts[p].prompt,
               "response": prefill + response, "finish_reason": finish, "num_tokens": num_tokens,
               **({"prefill": prefill} if prefill else {})}
        if getattr(prompts[p], "category", None) is not None:
            row["category"] = prompts[p].category
        rows.append(row)
    return rows, sum(out[2] for out in made.values())


def _generate_responses(model, tokenizer, prompts, n, settings, out_path, batch_prompts, seed, progress,
                        max_sequences, backend, engine, stats, prefill, first_index) -> list[dict]:
    settings = settings or DecodingConfig()
    if not settings.do_sample and n != 1:
        raise ValueError(f"greedy decoding gives one response per prompt; got n={n}")
    texts = [render_prompt(tokenizer, p.prompt) + prefill for p in prompts]
    prompts, texts, too_long = drop_too_long(prompts, texts, tokenizer, context_length(model),
                                             settings.max_new_tokens)
    ids = [str(p.id) for p in prompts]
    repeated = [i for i, c in Counter(ids).items() if c > 1]
    if repeated:
        raise ValueError(f"prompt ids must be unique; repeated: {repeated[:5]}")
    prompts_by_id = dict(zip(ids, prompts))
    calls = plan_calls(len(prompts), n, batch_prompts, max_sequences)
    done: dict[tuple[str, int], dict] = {}
    if out_path:
        meta = {"format": META_FORMAT, "engine": engine,
                "model": model_identity(model), "settings": settings.effective(), "n": n, "seed": seed,
                "layout": {"batch_prompts": batch_prompts, "max_sequences": max_sequences},
                **({"prefill": prefill, "first_index": first_index} if prefill or first_index else {})}
        if is_main():
            _check_meta(out_path, meta)
        if splitting():  # the others read the rows once the main process has checked the file
            barrier()
        done = {(pid, i - first_index): row for (pid, i), row in _existing_rows(out_path, prompts_by_id).items()}
    backend = backend or hf_backend(model, tokenizer, settings)
    wanted = len(prompts) * n
    todo = wanted - sum(1 for k in done if k[0] in prompts_by_id and k[1] < n)
    bar = tqdm(total=wanted, initial=wanted - todo, desc="sample", unit="seq", disable=not progress or not is_main())
    new_rows: list[dict] = []
    tokens, n_calls, start = 0, 0, time.perf_counter()
    pending = [call for call in calls if any((ids[p], i) not in done for p, r in call for i in r)]
    # Under a launcher each process makes every world_size-th call (each call's seed is its own, so the rows are
    # those of one process); the main process appends every call's rows in plan order.
    for first in range(0, len(pending), split_ways()):
        turn = pending[first:first + split_ways()]
        mine = [call for k, call in enumerate(turn) if my_turn(first + k)]
        made_here = [_run_call(backend, call, ids, texts, prompts, seed, done, prefill, first_index) for call in mine]
        for rows, call_tokens in (made for per_process in gather(made_here) for made in per_process):
            if out_path and is_main():
                append_jsonl(out_path, rows)
            for row in rows:
                done[(row["prompt_id"], row["sample_index"] - first_index)] = row
            new_rows += rows
            n_calls += 1
            tokens += call_tokens
            bar.update(len(rows))
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    if splitting() and out_path:  # every process may read the file next: the main process's rows are in it
        barrier()
    if stats is not None:
        stats.update(generated_tokens=tokens, seconds=time.perf_counter() - start, calls=n_calls,
                     new_rows=len(new_rows), skipped_too_long=len(too_long))
    missing_keys = [(pid, i) for pid in ids for i in range(n) if (pid, i) not in done]
    if missing_keys:  # cannot happen unless the plan is wrong; never hand back a file with gaps silently
        raise RuntimeError(f"sampling left {len(missing_keys)} rows missing, e.g. {missing_keys[:3]}")
    return [done[(pid, i)] for pid in ids for i in range(n)]
