"""Prompt formatting and batching. Tokenizers are duck-typed; torch is imported in ``collate``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.data.examples import Example

IGNORE_INDEX = -100


def user_text(example: Example) -> str:
    """The user turn: instruction, then the input after a blank line (either may be empty)."""
    return "\n\n".join(part for part in (example.instruction, example.input) if part)


def plain_prompt(example: Example) -> str:
    """Alpaca-style prompt for tokenizers without a chat template."""
    text = f"### Instruction:\n{example.instruction}\n\n"
    if example.input:
        text += f"### Input:\n{example.input}\n\n"
    return text + "### Response:\n"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer: Any, example: Example) -> str:
    """The prompt for generation: chat template with the generation prompt, else plain."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text(example)}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return plain_prompt(example)


def _response_text(tokenizer: Any, example: Example, prompt: str) -> str:
    if has_chat_template(tokenizer):
        full = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": user_text(example)},
                {"role": "assistant", "content": example.output},
            ],
            tokenize=False,
        )
        if full.startswith(prompt):  # keeps the template's end-of-turn tokens in the target
            return full[len(prompt) :]
    return example.output


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_example(
    tokenizer: Any, example: Example, max_length: int, *, add_eos: bool = True
) -> dict[str, list[int]]:
    """Tokenize for causal-LM training: ``input_ids`` and ``labels`` (-100 on the prompt).

    The chat template is used when the tokenizer has one (user = instruction + input, assistant
    = output), else :func:`plain_prompt` (prefixed by BOS when the tokenizer has one). The EOS
    (or SEP) token is appended to the response unless it already contains it. When too long,
    the middle of the prompt is cut (its head and the generation marker stay) down to half of
    ``max_length`` before the response's tail is cut.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    prompt = prompt_text(tokenizer, example)
    prompt_ids = _ids(tokenizer, prompt)
    if not has_chat_template(tokenizer) and getattr(tokenizer, "bos_token_id", None) is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    response_ids = _ids(tokenizer, _response_text(tokenizer, example, prompt))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    if add_eos and eos is not None and eos not in response_ids:
        response_ids.append(eos)
    if len(prompt_ids) + len(response_ids) > max_length:
        keep = max(max_length - len(response_ids), min(len(prompt_ids), max_length // 2))
        if keep < len(prompt_ids):
            head = keep // 2
            prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (keep - head) :]
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def label_mapping(examples: Sequence[Example]) -> dict[str, int]:
    """Sorted labels of ``examples`` -> class ids."""
    return {lab: i for i, lab in enumerate(sorted({e.label for e in examples if e.label}))}


def encode_classification(
    tokenizer: Any, example: Example, label_to_id: Mapping[str, int], max_length: int
) -> dict[str, Any]:
    """Tokenize for an encoder classifier: (instruction, input) as a pair, ``labels`` an int."""
    if example.label is None:
        raise ValueError(f"example of task {example.task!r} has no label")
    if example.label not in label_to_id:
        raise ValueError(
            f"label {example.label!r} (task {example.task!r}) not in label_to_id "
            f"{sorted(label_to_id)}"
        )
    if example.input:
        enc = tokenizer(example.instruction, example.input, truncation=True, max_length=max_length)
    else:
        enc = tokenizer(example.instruction, truncation=True, max_length=max_length)
    out: dict[str, Any] = {
        "input_ids": list(enc["input_ids"]),
        "labels": label_to_id[example.label],
    }
    if "token_type_ids" in enc:
        out["token_type_ids"] = list(enc["token_type_ids"])
    return out


def pad_id(tokenizer: Any, model: Any = None) -> int:
    """The id to pad batches with: the tokenizer's pad token, else the model config's, else
    the end-of-sequence token (the first of a list), else 0."""
    config = getattr(model, "config", None)
    for source, attr in (
        (tokenizer, "pad_token_id"),
        (config, "pad_token_id"),
        (tokenizer, "eos_token_id"),
        (config, "eos_token_id"),
    ):
        v = getattr(source, attr, None) if source is not None else None
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def collate(
    batch: Sequence[Mapping[str, Any]], pad_token_id: int, *, padding_side: str = "right"
) -> dict[str, Any]:
    """Pad a batch to its longest sequence; returns torch tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` lists with -100 (int labels are
    stacked), other sequence fields (token_type_ids) with 0; ``attention_mask`` marks real
    tokens. ``padding_side="left"`` for batched generation.
    """
    import torch

    if not batch:
        raise ValueError("collate: empty batch")
    if pad_token_id is None:
        raise ValueError("collate: pad_token_id is None (use tokenizer.eos_token_id if unset)")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    longest = max(len(b["input_ids"]) for b in batch)

    def pad(seq: Sequence[int], value: int) -> list[int]:
        fill = [value] * (longest - len(seq))
        return [*seq, *fill] if padding_side == "right" else [*fill, *seq]

    out: dict[str, Any] = {
        "input_ids": torch.tensor([pad(b["input_ids"], pad_token_id) for b in batch]),
        "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch]),
    }
    for name in batch[0]:
        if name in ("input_ids", "attention_mask"):
            continue
        values = [b[name] for b in batch]
        if isinstance(values[0], (int, float)):
            out[name] = torch.tensor(values)
        else:
            fill = IGNORE_INDEX if name == "labels" else 0
            out[name] = torch.tensor([pad(v, fill) for v in values])
    return out
