"""Tiny random models built from a config, shared by the model and client tests."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from fedlora.clients.models import LoraHost, default_target_modules


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3, **config) -> BertForSequenceClassification:
    """A tiny BERT classifier; `config` overrides BertConfig fields (e.g. dropouts)."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=num_labels,
        **config,
    )
    return BertForSequenceClassification(cfg).eval()


def llama_host(**kw) -> LoraHost:
    model = tiny_llama()
    return LoraHost(model, default_target_modules(model), **kw)
