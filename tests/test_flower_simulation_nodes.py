"""The simulation's node configs read from Flower's own in-memory link state (no Ray, no hello).

`fedlora.flower.nodes.simulation_node_configs` must give each virtual node the partition id
that Flower's simulation runtime gives it (`vce_api._register_nodes`'s node -> partition
mapping, which the ServerApp never sees), and nothing for a Grid of another kind.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from flwr.server.superlink.fleet.vce.vce_api import _register_nodes  # noqa: E402
from flwr.server.superlink.linkstate import LinkStateFactory  # noqa: E402
from flwr.supercore.constant import (
    FLWR_IN_MEMORY_DB_NAME,  # noqa: E402
    NOOP_FEDERATION_ID,  # noqa: E402
)
from flwr.supercore.object_store import ObjectStoreFactory  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.superlink.federation import NoOpFederationManager  # noqa: E402
from flwr.superlink.grid import InMemoryGrid  # noqa: E402

from fedlora.flower.nodes import simulation_node_configs  # noqa: E402

pytestmark = pytest.mark.flower


def _grid(run_id: int = 7) -> tuple[InMemoryGrid, LinkStateFactory]:
    """The Grid and link state exactly as `flwr.simulation.run_simulation._main_loop` makes
    them."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord, Task

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    run = Run.create_empty(run_id)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID  # the simulation's runs
    state = factory.state()
    state.run_ids[run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, factory


def test_simulation_node_configs_are_flowers_partition_mapping():
    grid, factory = _grid()
    assert simulation_node_configs(grid) == {}  # no nodes yet
    mapping = _register_nodes(300, factory)  # node id -> partition id, as the runtime assigns
    assert sorted(mapping.values()) == list(range(300))
    # node ids are random: sorting them does not give the partition order
    assert sorted(mapping) != list(mapping)
    got = simulation_node_configs(grid)
    assert got == {n: {"partition-id": p} for n, p in mapping.items()}


def test_other_grids_are_asked():
    class Grid:  # a deployment's or a test's Grid: no in-memory link state
        def get_node_ids(self):
            return [1, 2]

    assert simulation_node_configs(Grid()) == {}
