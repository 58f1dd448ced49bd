"""flwr-datasets partitioners as ``data.partitioner`` (`fedlora.data.flwr_partition`)."""

from __future__ import annotations

import pytest

from fedlora.data import Example
from fedlora.data.flwr_partition import FlwrPartitioner, examples_dataset
from fedlora.engine import run_experiment
from fedlora.federation.build import build_split, load_data
from fedlora.federation.config import ConfigError, load_preset

P = pytest.importorskip("flwr_datasets.partitioner")


def labelled(n: int = 200, classes: int = 5) -> list[Example]:
    return [Example("t", "classify", f"x{i}", "", label=f"c{i % classes}") for i in range(n)]


def test_same_indices_as_the_partitioner_itself():
    ex = labelled()
    got = FlwrPartitioner(
        "flwr_datasets:DirichletPartitioner", {"alpha": 0.3, "min_partition_size": 5}
    )(ex, 4, 7)
    ref = P.DirichletPartitioner(
        num_partitions=4, partition_by="label", alpha=0.3, min_partition_size=5, seed=7
    )
    ref.dataset = examples_dataset(ex)
    assert got == [sorted(ref.load_partition(i)["index"]) for i in range(4)]
    assert sorted(i for part in got for i in part) == list(range(len(ex)))
    assert len({len(p) for p in got}) > 1  # alpha 0.3: unequal sizes


def test_pathological_gives_each_client_its_classes():
    parts = FlwrPartitioner(
        "flwr_datasets:PathologicalPartitioner",
        {"num_classes_per_partition": 2, "class_assignment_mode": "deterministic"},
    )(labelled(), 5, 0)
    ex = labelled()
    assert [len({ex[i].label for i in p}) for p in parts] == [2] * 5


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("flwr_datasets:DirichletPartitoner", {"alpha": 1}, "did you mean 'DirichletPartitioner'"),
        ("DirichletPartitioner", {}, "expected 'flwr_datasets:<Partitioner class>'"),
        ("flwr_datasets:DirichletPartitioner", {"alpha": 1, "alpah": 1}, r"alpah: .*'alpha'"),
        ("flwr_datasets:DirichletPartitioner", {}, "needs alpha"),
        ("flwr_datasets:IidPartitioner", {"num_partitions": 3}, "set from data.num_clients"),
        ("flwr_datasets:VerticalEvenPartitioner", {}, "splits columns"),
    ],
)
def test_bad_partitioner_is_one_line_naming_the_key(name, options, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_preset("tiny", {"data.partitioner": name, "data.partitioner_options": options})
    assert "data.partitioner" in str(e.value) and "\n" not in str(e.value)


def test_a_tiny_run_on_a_flwr_datasets_dirichlet_split(tmp_path):
    cfg = load_preset(
        "tiny",
        {
            "output_dir": str(tmp_path / "run"),
            "rounds": 1,
            "data.num_clients": 3,
            "clients_per_round": 3,
            "data.partitioner": "flwr_datasets:DirichletPartitioner",
            "data.partitioner_options": {"alpha": 0.5, "min_partition_size": 20},
            "eval.max_examples": 4,
            "eval.bootstrap": 0,
        },
    )
    examples = load_data(cfg)
    split = build_split(cfg, examples)
    # partition_by defaults to "task" (the tiny tasks are not all labelled), the held-out
    # task stays out of every client
    tasks = [{examples[i].task for i in split.train[c] + split.test[c]} for c in range(3)]
    assert all(tasks) and not any("chat_emotion" in t for t in tasks)
    result = run_experiment(cfg, progress=False, save_final=False)
    assert result.round_rows()[0]["used"] == 3
    again = build_split(cfg, examples)  # seeded: the same split every time
    assert again.train == split.train and again.test == split.test


def test_side_by_side_script_measures_both(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "partition_compare.py"
    spec = importlib.util.spec_from_file_location("partition_compare", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.main(["--task", "wn_part_of_speech", "--clients", "4", "--seeds", "2",
                     "--alphas", "0.5", "--classes-per-client", "1"])  # fmt: skip
    rows = [line for line in text.splitlines() if line.startswith("| dirichlet")]
    assert [r.split(":")[1].split("|")[0].strip() for r in rows] == ["fedlora", "flwr-datasets"]
    # pathological with one class per client: exactly one class and zero entropy per client
    fedlora_path = next(r for r in text.splitlines() if r.startswith("| pathological k=1: fedlora"))
    assert "| 1.00 ± 0.00 | 0.00 ± 0.00 |" in fedlora_path
    assert mod.label_stats(["a", "a", "b", "b"], [[0, 2], [1, 3]])["TV"] == 0.0
