"""Shared helpers of the tests that drive Flower apps in this process: the task identity a
ServerApp's messages need, and Flower's wire format."""

from __future__ import annotations

import pytest
from flwr.app import RecordDict
from flwr.common import serde


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need the ServerApp's task identity, which Flower sets in a real run (autouse
    in every module that imports it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def wire(content: RecordDict) -> RecordDict:
    """Through Flower's protobuf serialisation and back, as over the network."""
    return serde.recorddict_from_proto(serde.recorddict_to_proto(content))
