from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlora.federation.resources import (
    DISTRIBUTIONS,
    RANK_TYPES,
    RankType,
    assign_resources,
    client_ranks,
    module_kind,
    resource_ranks,
    resource_summary,
)

LLAMA = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.down_proj",
]


def test_rank_types_match_the_paper():
    assert RANK_TYPES == {1: (8, 8), 2: (30, 30), 3: (30, 200), 4: (200, 200)}


@pytest.mark.parametrize("n", [1, 4, 7, 20, 33, 100])
def test_uniform_counts(n):
    counts = Counter(assign_resources(n, "uniform", seed=3))
    assert sum(counts.values()) == n
    assert all(counts[t] in (n // 4, n // 4 + 1) for t in RANK_TYPES)


@pytest.mark.parametrize("n", [1, 5, 10, 20, 33, 100])
@pytest.mark.parametrize("share", [0.8, 0.85, 1.0])
def test_heavy_tail_counts(n, share):
    for dist, extreme in (("heavy_tail_light", 1), ("heavy_tail_strong", 4)):
        counts = Counter(assign_resources(n, dist, share=share, seed=0))
        m = round(share * n)
        assert counts[extreme] == m and sum(counts.values()) == n
        rest = [counts[t] for t in RANK_TYPES if t != extreme]
        assert sum(rest) == n - m and max(rest) - min(rest) <= 1


@pytest.mark.parametrize("n", [4, 10, 20, 50, 101])
def test_normal_counts_peak_in_the_middle(n):
    counts = Counter(assign_resources(n, "normal", seed=0))
    assert sum(counts.values()) == n
    assert min(counts[2], counts[3]) >= max(counts[1], counts[4])
    assert abs(counts[2] - counts[3]) <= 1 and abs(counts[1] - counts[4]) <= 1
    if n >= 20:
        assert counts[2] + counts[3] > 0.6 * n


def test_homogeneous():
    assert assign_resources(6, "homogeneous") == [1] * 6
    assert assign_resources(6, "homogeneous", homogeneous_type=4) == [4] * 6


@given(n=st.integers(1, 200), seed=st.integers(0, 10**6), dist=st.sampled_from(DISTRIBUTIONS[:4]))
def test_seeding_and_valid_types(n, seed, dist):
    a = assign_resources(n, dist, seed=seed)
    assert a == assign_resources(n, dist, seed=seed)
    assert len(a) == n and set(a) <= set(RANK_TYPES)


def test_different_seeds_shuffle_differently():
    runs = {tuple(assign_resources(40, "uniform", seed=s)) for s in range(5)}
    assert len(runs) == 5


def test_module_kind_classifier():
    attn = [
        "model.layers.3.self_attn.o_proj",
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.output.dense",
        "transformer.h.0.attn.c_proj",
        "k_proj",
        "value",
    ]
    mlp = [
        "model.layers.3.mlp.up_proj",
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense",
        "transformer.h.0.mlp.c_proj",
        "model.decoder.layers.0.fc2",
    ]
    assert [module_kind(m) for m in attn] == ["attention"] * len(attn)
    assert [module_kind(m) for m in mlp] == ["mlp"] * len(mlp)
    assert module_kind("lm_head") is None


def test_type3_differs_between_attention_and_mlp():
    r = resource_ranks(3, LLAMA)
    assert r == {LLAMA[0]: 30, LLAMA[1]: 30, LLAMA[2]: 200, LLAMA[3]: 200}
    assert set(resource_ranks(1, LLAMA).values()) == {8}
    assert set(resource_ranks(4, LLAMA).values()) == {200}


def test_scaling_to_small_models():
    assert set(resource_ranks(3, LLAMA, divisor=8).values()) == {4, 25}
    assert set(resource_ranks(1, LLAMA, divisor=100).values()) == {1}  # never below 1
    dims = {m: (64, 256) for m in LLAMA}
    capped = resource_ranks(4, LLAMA, cap_fraction=0.5, dims=dims)
    assert set(capped.values()) == {32}
    with pytest.raises(ValueError, match="dims"):
        resource_ranks(4, LLAMA, cap_fraction=0.5)


def test_client_ranks_and_custom():
    res = assign_resources(3, "custom", custom=[2, (4, 16), {m: 5 for m in LLAMA}])
    ranks = client_ranks(res, LLAMA)
    assert ranks[0] == dict.fromkeys(LLAMA, 30)
    assert [ranks[1][m] for m in LLAMA] == [4, 4, 16, 16]
    assert ranks[2] == dict.fromkeys(LLAMA, 5)
    by_id = assign_resources(2, "custom", custom={1: 4, 0: RankType(2, 3)})
    assert by_id == [RankType(2, 3), 4]
    summary = resource_summary(res)
    assert dict(summary) == {"type2": 1, "attn4/mlp16": 1, "custom": 1}
    assert "type2" in str(summary) and "33.3%" in summary.format()


def test_resource_summary_counts():
    s = resource_summary(assign_resources(20, "heavy_tail_strong", share=0.8))
    assert s["type4"] == 16 and sorted(s[k] for k in ("type1", "type2", "type3")) == [1, 1, 2]
    assert list(s) == ["type1", "type2", "type3", "type4"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distribution": "uniform", "share": 0.0}, "share"),
        ({"distribution": "uniform", "share": 1.5}, "share"),
        ({"distribution": "zipf"}, "zipf.*heavy_tail_light"),
        ({"distribution": "custom"}, "custom"),
        ({"distribution": "custom", "custom": [1, 2, (0, 8)]}, "client 2"),
        ({"distribution": "custom", "custom": [1, {"a": -3}, 2]}, "client 1"),
        ({"distribution": "custom", "custom": [1, 2, 9]}, "client 2"),
        ({"distribution": "custom", "custom": [1, 2]}, "2 entries"),
        ({"distribution": "custom", "custom": {0: 1, 1: 2}}, "client 2"),
        ({"distribution": "homogeneous", "homogeneous_type": 7}, "homogeneous_type"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_resources(3, **kwargs)


def test_rank_errors():
    with pytest.raises(ValueError, match="lm_head"):
        resource_ranks(1, ["lm_head"])
    assert resource_ranks(1, ["lm_head"], default_kind="mlp") == {"lm_head": 8}
    with pytest.raises(ValueError, match="module 'b'"):
        resource_ranks({"a": 4}, ["a", "b"])
    with pytest.raises(ValueError, match="unknown rank type 5"):
        resource_ranks(5, LLAMA)
    with pytest.raises(ValueError, match="num_clients"):
        assign_resources(0, "uniform")
