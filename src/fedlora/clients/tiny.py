"""Tiny random models built from a config, for tests and large client-count simulations.

* ``"tiny-llama"``: a 2-layer Llama (hidden 32) with a byte-level tokenizer (256 bytes +
  ``<pad> <s> </s> <unk>``), built offline without any download.
* ``"tiny-bert"``: a 2-layer BERT (hidden 32) sequence classifier with the packaged MiniLM's
  WordPiece tokenizer (byte-level when that package is missing).

Weights are drawn from a fixed seed inside ``torch.random.fork_rng``: every process builds the
identical model and the caller's RNG is untouched.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_SEED = 1234
TINY_MODELS = ("tiny-llama", "tiny-bert")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def byte_tokenizer() -> Any:
    """A byte-level fast tokenizer (no merges): every UTF-8 byte is a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _minilm_tokenizer() -> Any | None:
    try:
        from transformers import AutoTokenizer

        from fedlora.clients.models import builtin_model_path

        return AutoTokenizer.from_pretrained(builtin_model_path("minilm"), local_files_only=True)
    except Exception:  # noqa: BLE001 - the package is optional for tiny models
        return None


def build_tiny(name: str, kind: str = "causal", num_labels: int | None = None, *, hidden=32):
    """``(model, tokenizer)`` of a tiny random model (see the module docstring)."""
    if name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = byte_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        cls = LlamaForCausalLM
    elif name == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        tok = _minilm_tokenizer() or byte_tokenizer()
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            num_labels=num_labels or 2,
            pad_token_id=tok.pad_token_id,
        )
        cls = BertForSequenceClassification
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    if kind != ("classifier" if name == "tiny-bert" else "causal"):
        raise ValueError(f"{name} is not a {kind} model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = cls(config)
    model.eval()
    return model, tok
