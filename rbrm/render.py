"""The one place where (prompt, response) becomes text and tokens.

Every stage (probe features, sampling, re-ranking, DPO, evaluation) goes through these functions, so the
hidden state the probe learns from is taken at the same token everywhere: the end-of-turn token that
closes the response ("endpoint token").
"""

from __future__ import annotations

Message = dict[str, str]
Prompt = str | list[Message]  # a user message, or a conversation that ends with a user turn

_SENTINEL = "\u2063rbrm-sentinel\u2063"


def to_messages(prompt: Prompt) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def prompt_key(prompt: Prompt) -> str:
    """A stable string for grouping and de-duplicating prompts (single- or multi-turn)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def matching_key(prompt: Prompt) -> str:
    """`prompt_key`, case- and space-insensitive: how evaluation prompts are kept out of training, and how one
    prompt in several evaluation sets is pooled once."""
    return " ".join(prompt_key(prompt).lower().split())


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The prompt as the model sees it before its answer (chat template with the generation prompt)."""
    messages = to_messages(prompt)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def prompt_length(tokenizer, prompt: Prompt) -> int:
    """Tokens of the rendered prompt (what a forward or a generation prefills), for the compute ledger."""
    return len(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def end_of_turn(tokenizer) -> str:
    """The text the chat template puts right after an assistant message (e.g. `<|im_end|>`), whitespace cut.

    Templates that close a turn with nothing fall back to the EOS token, so a response always ends on a
    token that marks its end.
    """
    cached = getattr(tokenizer, "_rbrm_end_of_turn", None)
    if cached is not None:
        return cached
    marker = ""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if _SENTINEL in full:
            marker = full[full.rindex(_SENTINEL) + len(_SENTINEL):].rstrip()
    if not marker:
        marker = tokenizer.eos_token or ""
    try:
        tokenizer._rbrm_end_of_turn = marker
    except AttributeError:
        pass
    return marker


def render(tokenizer, prompt: Prompt, response: str) -> tuple[str, str]:
    """(prompt text, completion text); the completion is the response closed by the end-of-turn marker."""
    prompt_text = render_prompt(tokenizer, prompt)
    if not has_chat_template(tokenizer):
        response = " " + response.lstrip()
    return prompt_text, response + end_of_turn(tokenizer)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize(tokenizer, prompt_text: str, completion_text: str) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, completion), split where the tokenised prompt and prompt+completion diverge.

    This is how TRL's DPOTrainer tokenises, so DPO sees exactly the tokens the probe was trained on.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt_text + completion_text, add_special_tokens=False)["input_ids"]
    cut = _common_prefix_length(prompt_ids, full_ids)
    return prompt_ids[:cut], full_ids[cut:]
