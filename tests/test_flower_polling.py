"""`fedlora.flower.server_app.PollingGrid`: every reply collected, at most `window` in flight."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from fedlora.flower.server_app import PollingGrid, simulation_window  # noqa: E402

pytestmark = pytest.mark.flower


class FakeGrid:
    """Answers each pushed message on the second pull after its push; records the most
    messages in flight."""

    def __init__(self, answer: bool = True) -> None:
        self.flight: dict[str, int] = {}  # message id -> pulls seen
        self.most = 0
        self.pushed: list[str] = []
        self.answer = answer

    def push_messages(self, messages):
        ids = [f"m{m}" for m in messages]
        self.pushed += ids
        self.flight.update(dict.fromkeys(ids, 0))
        self.most = max(self.most, len(self.flight))
        return ids

    def pull_messages(self, ids):
        out = []
        for i in list(ids):
            self.flight[i] += 1
            if self.answer and self.flight[i] >= 2:
                del self.flight[i]
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)))
        return out


@pytest.mark.parametrize("window,most", [(None, 50), (4, 4), (1, 1)])
def test_window_bounds_messages_in_flight_and_all_replies_arrive(window, most):
    grid = FakeGrid()
    replies = PollingGrid(grid, 0.0, window).send_and_receive(range(50), timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        f"m{i}" for i in range(50)
    )
    assert grid.most == most


def test_window_may_be_decided_at_each_exchange_and_timeout_stops_pushing():
    grid = FakeGrid(answer=False)  # never answers
    replies = PollingGrid(grid, 0.01, lambda: 3).send_and_receive(range(10), timeout=0.05)
    assert replies == [] and grid.pushed == ["m0", "m1", "m2"]  # the rest never sent


def test_simulation_window_setting():
    assert simulation_window({"simulation-in-flight": 0}) is None
    assert simulation_window({"simulation-in-flight": "6"}) == 6
    assert simulation_window({}) >= 4  # auto: twice Ray's CPUs when Ray is up, else 4
