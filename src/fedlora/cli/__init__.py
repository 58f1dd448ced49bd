"""Running and reporting: the ``fedlora`` command (`fedlora.cli.commands`), run and compare
reports (`report`), and the statistics of comparisons (`comparison`).

The top layer: it may import every layer below (engines, federation, clients, strategies,
core, data); nothing in fedlora imports it.
"""

from fedlora.cli.commands import main

__all__ = ["main"]
