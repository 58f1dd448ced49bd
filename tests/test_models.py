"""fedlora.clients.models: loading, target modules, and the LoRA host (tiny random models)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tiny_models import llama_host, tiny_bert, tiny_llama
from transformers import (
    AutoModelForCausalLM,
)

from fedlora.clients.models import (
    LoraHost,
    builtin_model_path,
    default_modules_to_save,
    default_target_modules,
    load_model,
)
from fedlora.core.contract import ClientSpec, FedLoraError, LoraFactors, Payload, init_lora

LLAMA_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def mixed_ranks(host: LoraHost, attn: int = 3, mlp: int = 20) -> dict[str, int]:
    """The 'attention 30 / MLP 200' rank type scaled down (MLP ranks above min(d_out, d_in))."""
    return {m: (attn if "self_attn" in m else mlp) for m in host.module_names()}


def random_adapter(host: LoraHost, ranks: dict[str, int], scale: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, r in ranks.items():
        d_out, d_in = host.shapes()[m]
        out[m] = LoraFactors(
            torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scale
        )
    return out


IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 7, 8], [3, 4, 5, 6, 7, 8, 9, 10]])


def test_default_target_modules_llama_and_bert():
    llama = tiny_llama()
    names = default_target_modules(llama)
    assert len(names) == 2 * 7
    assert {n.rsplit(".", 1)[1] for n in names} == set(LLAMA_SUFFIXES)
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" not in names
    bert = default_target_modules(tiny_bert())
    assert "bert.encoder.layer.0.attention.self.query" in bert
    assert "bert.encoder.layer.1.attention.output.dense" in bert
    assert "bert.encoder.layer.1.intermediate.dense" in bert
    assert "bert.encoder.layer.1.output.dense" in bert
    assert len(bert) == 2 * 6 and "classifier" not in bert and "bert.pooler.dense" not in bert


def test_rank_patterns_give_intended_shapes_and_cache_per_config():
    host = llama_host()
    assert host.shapes()["model.layers.0.mlp.up_proj"] == (64, 32)
    assert host.shapes()["model.layers.0.self_attn.k_proj"] == (16, 32)
    for ranks in (
        {m: 8 for m in host.module_names()},
        mixed_ranks(host),
        {m: 200 for m in host.module_names()},  # far above min(d_out, d_in)
    ):
        spec = ClientSpec("c", ranks)
        host.prepare(spec, Payload(None, None, seed=3))
        for m, (a, b, s) in host.lora_weights().items():
            d_out, d_in = host.shapes()[m]
            assert tuple(a.shape) == (ranks[m], d_in) and tuple(b.shape) == (d_out, ranks[m])
            assert s == pytest.approx(16.0 / ranks[m], rel=0, abs=0)
    # the first configuration again reuses its cached peft adapter
    n = len(host.peft.peft_config)
    host.prepare(ClientSpec("d", {m: 8 for m in host.module_names()}), Payload(None, None))
    assert len(host.peft.peft_config) == n == 3
    # fresh init = contract's init_lora (same seed, same A) and only the spec's modules
    only = {"model.layers.1.mlp.down_proj": 5}
    host.prepare(ClientSpec("e", only, rslora=True), Payload(None, None, seed=3))
    got = host.read_adapter()
    ref = init_lora(3, "model.layers.1.mlp.down_proj", 5, (32, 64), 16.0 / 5**0.5)
    assert list(got) == list(only)
    assert torch.equal(got["model.layers.1.mlp.down_proj"].A, ref.A)
    assert torch.equal(got["model.layers.1.mlp.down_proj"].B, ref.B)
    assert got["model.layers.1.mlp.down_proj"].scale == ref.scale


def test_cache_evicts_beyond_max_adapters():
    host = llama_host(max_adapters=2)
    for r in (1, 2, 3, 4):
        host.prepare(ClientSpec("c", {m: r for m in host.module_names()}), Payload(None, None))
    assert len(host.peft.peft_config) == 2
    assert host.active_ranks["model.layers.0.mlp.up_proj"] == 4


def test_payload_roundtrip_is_exact():
    host = llama_host()
    ranks = mixed_ranks(host)
    adapter = random_adapter(host, ranks, scale=0.37)
    host.prepare(ClientSpec("c", ranks), Payload(None, adapter, frozenset({"B"})))
    out = host.read_adapter()
    assert list(out) == list(adapter)
    for m, f in adapter.items():
        assert torch.equal(out[m].A, f.A) and torch.equal(out[m].B, f.B)
        assert out[m].scale == f.scale and out[m].A.dtype == torch.float32
    a, b = host.trainable_parameters()
    assert not a and len(b) == len(adapter)


def test_lora_forward_matches_dense_delta():
    host = llama_host()
    ranks = mixed_ranks(host)
    adapter = random_adapter(host, ranks, scale=0.01)
    model = host.prepare(ClientSpec("c", ranks), Payload(None, adapter))
    model.eval()
    with torch.no_grad():
        lora_logits = model(IDS).logits
        with host.use_global(adapter) as merged:
            merged_logits = merged(IDS).logits
        base = tiny_llama()(IDS).logits
    torch.testing.assert_close(lora_logits, merged_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(lora_logits, base, atol=1e-3)


def test_merge_fold_equals_scaled_product_and_restores_exactly():
    host = llama_host()
    original = {m: lin.weight.detach().clone() for m, lin in host._base.items()}
    ranks = mixed_ranks(host)
    merge = random_adapter(host, ranks, scale=0.05, seed=7)
    merge["model.layers.0.self_attn.q_proj"] = LoraFactors(torch.zeros(0, 32), torch.zeros(32, 0))
    host.prepare(ClientSpec("c", {m: 4 for m in ranks}), Payload(merge, None))
    for m, lin in host._base.items():
        f = merge[m]
        ref = f.scale * (f.B.double() @ f.A.double())
        got = lin.weight.double() - original[m].double()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert torch.equal(
        host._base["model.layers.0.self_attn.q_proj"].weight,
        original["model.layers.0.self_attn.q_proj"],
    )
    # a later client without a merge trains on the exact original weights
    host.prepare(ClientSpec("d", {m: 2 for m in ranks}), Payload(None, None))
    for m, lin in host._base.items():
        assert torch.equal(lin.weight, original[m])
    # use_global restores the prepared client's merge on exit
    host.prepare(ClientSpec("c", {m: 4 for m in ranks}), Payload(merge, None))
    folded = {m: lin.weight.clone() for m, lin in host._base.items()}
    with host.use_global(None):
        for m, lin in host._base.items():
            assert torch.equal(lin.weight, original[m])
    for m, lin in host._base.items():
        assert torch.equal(lin.weight, folded[m])


def test_errors_name_client_and_module():
    host = llama_host()
    spec = ClientSpec("alice", {"model.layers.0.mlp.up_proj": 2})
    bad = {"model.layers.9.mlp.up_proj": LoraFactors(torch.zeros(2, 32), torch.zeros(64, 2))}
    with pytest.raises(FedLoraError, match=r"client alice.*model\.layers\.9\.mlp\.up_proj"):
        host.prepare(spec, Payload(None, bad))
    wrong = {"model.layers.0.mlp.up_proj": LoraFactors(torch.zeros(2, 64), torch.zeros(32, 2))}
    with pytest.raises(FedLoraError, match=r"client alice, adapter module model.layers.0.mlp"):
        host.prepare(spec, Payload(None, wrong))
    with pytest.raises(FedLoraError, match=r"client alice, merge module .*shape"):
        host.prepare(spec, Payload(wrong, None))
    with pytest.raises(FedLoraError, match="client bob.*nope"):
        host.prepare(ClientSpec("bob", {"nope": 2}), Payload(None, None))
    with pytest.raises(FedLoraError, match="not an nn.Linear"):
        LoraHost(tiny_llama(), ["nope"])


def test_save_adapter_loads_in_plain_peft_and_merge_and_save(tmp_path):
    from peft import PeftModel

    host = llama_host()
    ranks = mixed_ranks(host, attn=3, mlp=5)
    delta = random_adapter(host, ranks, scale=1.0, seed=11)
    delta = {m: LoraFactors(f.A * 0.1, f.B * 0.1, 1.0) for m, f in delta.items()}
    delta["model.layers.0.self_attn.q_proj"] = LoraFactors(torch.zeros(0, 32), torch.zeros(32, 0))
    host.prepare(ClientSpec("c", {m: 2 for m in ranks}), Payload(None, None))
    with torch.no_grad(), host.use_global(delta) as m:
        expected = m(IDS).logits
    for alpha in (None, 16.0):
        out = host.save_adapter(delta, tmp_path / f"adapter_{alpha}", alpha=alpha)
        peft_model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
        with torch.no_grad():
            got = peft_model(IDS).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        lora_b = peft_model.base_model.model.model.layers[1].mlp.up_proj.lora_B["default"]
        assert lora_b.weight.shape == (64, 5)
    merged_dir = host.merge_and_save(delta, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_classifier_head_frozen_and_targetable():
    model = tiny_bert()
    head = model.classifier.weight.clone()
    host = LoraHost(model, default_target_modules(model) + ["classifier"])
    assert host.shapes()["classifier"] == (3, 32)
    host.prepare(ClientSpec("c", {m: 4 for m in host.module_names()}), Payload(None, None))
    trainable = [n for n, p in host.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert any(n.startswith("classifier.lora_A") for n in trainable)
    assert torch.equal(host.model.classifier.base_layer.weight, head)


def test_builtin_model_errors():
    with pytest.raises(FedLoraError, match="smollm2"):
        builtin_model_path("gpt5")
    with pytest.raises(FedLoraError, match="kind"):
        load_model("smollm2", kind="seq2seq")


@pytest.mark.real_model
def test_real_smollm2_cache_conversion_and_minilm(tmp_path, monkeypatch):
    from fedlora.clients import models

    path = builtin_model_path("smollm2", cache=tmp_path)
    assert path.startswith(str(tmp_path)) and os.path.exists(os.path.join(path, "config.json"))
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.startswith(".")]  # no temp left
    stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns

    def converted_again(*a, **k):
        raise AssertionError("the cached copy was converted again")

    # the second call is a cache hit: no conversion, the weights untouched (not a timing)
    monkeypatch.setattr(models, "_convert_gguf", converted_again)
    assert builtin_model_path("smollm2", cache=tmp_path) == path
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode(nxt)
    names = default_target_modules(model)
    assert len(names) == 30 * 7
    # the encoder for classification: head seeded identically in two loads
    m1, tok1 = load_model("minilm", kind="classifier", num_labels=4)
    m2, _ = load_model("minilm", kind="classifier", num_labels=4)
    assert torch.equal(m1.classifier.weight, m2.classifier.weight)
    assert tok1.pad_token is not None and len(default_target_modules(m1)) == 6 * 6


def test_copy_is_not_needed_per_client():
    """Two clients of different rank configurations share one model object and its weights."""
    host = llama_host()
    m1 = host.prepare(ClientSpec("a", {m: 8 for m in host.module_names()}), Payload(None, None))
    m2 = host.prepare(ClientSpec("b", mixed_ranks(host)), Payload(None, None))
    assert m1 is m2 is host.model


def test_default_head_is_saved_and_loads_with_the_adapter_in_plain_peft(tmp_path):
    from peft import PeftModel

    def bert():
        return tiny_bert(0, 3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    model = bert()
    # the whole head: the pooler (dense + tanh over the first token) and the classifier
    assert default_modules_to_save(model, "classifier") == ["classifier", "bert.pooler"]
    assert default_modules_to_save(tiny_llama(), "causal") == []
    host = LoraHost(model, default_target_modules(model),
                    modules_to_save=default_modules_to_save(model, "classifier"))  # fmt: skip
    assert host.dense_shapes() == {"classifier.weight": (3, 32), "classifier.bias": (3,),
                                   "bert.pooler.dense.weight": (32, 32),
                                   "bert.pooler.dense.bias": (32,)}  # fmt: skip
    ranks = {m: 2 for m in host.module_names()}
    delta = random_adapter(host, ranks, scale=1.0, seed=3)
    delta = {m: LoraFactors(f.A * 0.2, f.B * 0.2, 1.0) for m, f in delta.items()}
    g = torch.Generator().manual_seed(1)
    head = {"classifier.weight": torch.randn(3, 32, generator=g), "classifier.bias": torch.ones(3),
            "bert.pooler.dense.weight": 0.2 * torch.randn(32, 32, generator=g),
            "bert.pooler.dense.bias": 0.1 * torch.randn(32, generator=g)}  # fmt: skip
    ids = torch.randint(1, 100, (2, 7), generator=g)
    host.prepare(ClientSpec("c", ranks), Payload(None, None))
    with torch.no_grad(), host.use_global(delta, head) as m:
        expected = m(ids).logits
        # independent reference: the head applied by hand to the first token's hidden state
        first = m.bert(ids).last_hidden_state[:, 0].double()
        pw, pb = head["bert.pooler.dense.weight"].double(), head["bert.pooler.dense.bias"].double()
        pooled = torch.tanh(first @ pw.T + pb)
        ref = pooled @ head["classifier.weight"].double().T + head["classifier.bias"].double()
    torch.testing.assert_close(expected.double(), ref, rtol=1e-5, atol=1e-5)
    out = host.save_adapter(delta, tmp_path / "adapter", dense=head)
    peft_model = PeftModel.from_pretrained(bert(), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(FedLoraError, match="both in modules_to_save and a LoRA target"):
        LoraHost(bert(), ["classifier"], modules_to_save=["classifier"])
    with pytest.raises(FedLoraError, match="modules_to_save entry 'nope' is not a module"):
        LoraHost(bert(), default_target_modules(bert()), modules_to_save=["nope"])
