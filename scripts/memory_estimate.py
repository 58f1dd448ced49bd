"""Device memory one fedlora client needs on a 7-8B model, by arithmetic on the model's shapes
(built on torch's meta device: nothing is downloaded or allocated).

Counts, per client of FlexLoRA's resource types 1-4:

* base weights: the linear layers in 4-bit NF4 with double quantization (0.5 byte per weight
  plus about 0.127 bit of block statistics), everything else (embeddings, norms, lm_head,
  which bitsandbytes leaves unquantized) in bf16;
* LoRA: float32 factors + their gradients + AdamW's two moments = 16 bytes per parameter;
* activations with ``train.gradient_checkpointing``: the checkpointed input of every decoder
  layer (bf16) plus float32 logits for the loss, for one micro-batch; a lower bound (one
  layer's recomputed activations and allocator slack come on top).

    python scripts/memory_estimate.py [--batch-size 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from fedlora.clients.models import default_target_modules
from fedlora.federation.resources import resource_ranks

GIB = 2**30
NF4_DQ_BYTES = 0.5 + 0.127 / 8  # per weight: 4 bits + double-quantized block statistics


def llama3_8b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    )  # fmt: skip
    return "Llama-3-8B", LlamaForCausalLM, cfg


def mistral_7b():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    )  # fmt: skip
    return "Mistral-7B-v0.3", MistralForCausalLM, cfg


def estimate(name, cls, cfg, batch: int, seq: int) -> None:
    with torch.device("meta"):
        model = cls(cfg)
    targets = default_target_modules(model)
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.endswith("lm_head")
    )
    total = sum(p.numel() for p in model.parameters())
    base = linear * NF4_DQ_BYTES + (total - linear) * 2
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if n in targets}
    acts = (
        cfg.num_hidden_layers * batch * seq * cfg.hidden_size * 2 + batch * seq * cfg.vocab_size * 4
    )
    print(f"{name}: {total / 1e9:.2f} B parameters, 4-bit base {base / GIB:.1f} GiB, "
          f"activations >= {acts / GIB:.1f} GiB (batch {batch} x {seq}, checkpointed)")  # fmt: skip
    for rank_type in (1, 2, 3, 4):
        ranks = resource_ranks(rank_type, targets)
        lora = sum(r * (shapes[m][0] + shapes[m][1]) for m, r in ranks.items())
        need = base + lora * 16 + acts
        print(f"  type {rank_type}: {lora / 1e6:7.1f} M LoRA parameters ({lora * 16 / GIB:4.1f} "
              f"GiB with grads and AdamW), client total >= {need / GIB:5.1f} GiB")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    for build in (llama3_8b, mistral_7b):
        estimate(*build(), args.batch_size, args.seq_len)


if __name__ == "__main__":
    main()
