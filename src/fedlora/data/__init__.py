"""Data for fedlora: built-in tasks, loaders, federated partitioners, prompt encoding.

Importing this package needs only numpy; transformers/datasets/torch load on first use.
"""

from fedlora.data.examples import (
    Example,
    TaskInfo,
    builtin_tasks,
    load_builtin,
    load_examples,
)
from fedlora.data.partition import (
    SCHEMES,
    FederatedSplit,
    PartitionSummary,
    make_federated_split,
    partition,
)
from fedlora.data.prompts import (
    IGNORE_INDEX,
    collate,
    encode_classification,
    encode_example,
    label_mapping,
    pad_id,
    plain_prompt,
    prompt_text,
)

__all__ = [
    "IGNORE_INDEX",
    "SCHEMES",
    "Example",
    "FederatedSplit",
    "PartitionSummary",
    "TaskInfo",
    "builtin_tasks",
    "collate",
    "pad_id",
    "encode_classification",
    "encode_example",
    "label_mapping",
    "load_builtin",
    "load_examples",
    "make_federated_split",
    "partition",
    "plain_prompt",
    "prompt_text",
]
