"""The researcher's model and data (nothing fedlora-specific here).

The model is a tiny Llama built from a config with a fixed seed, so every node and the server
hold the same base weights (a real app would load one checkpoint). The data are token
sequences of a simple "count upwards" language whose step size depends on the partition:
non-IID clients of one task.
"""

from __future__ import annotations

import torch

VOCAB = 64
TARGETS = ["q_proj", "v_proj"]


def build_model() -> torch.nn.Module:
    """The shared base model (seeded: identical on every node)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return LlamaForCausalLM(config).eval()


def load_partition(partition_id: int, n: int = 16, length: int = 12) -> list[dict]:
    """Partition `partition_id`'s examples, pre-tokenized (``input_ids``, ``labels``)."""
    g = torch.Generator().manual_seed(partition_id)
    step = 1 + partition_id % 3
    out = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        ids = [(start + step * i) % VOCAB for i in range(length)]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out
