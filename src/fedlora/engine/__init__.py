"""The in-process engine: `run_experiment` simulates every client on one loaded base model.

It keeps the loop of named steps and when it checkpoints; the run directory's rules
(`fedlora.federation.rundir`), the checkpoint format, building the federation and a round's steps
are the federation core's (`fedlora.federation`), which the
Flower engine calls too. It may import the federation, clients, strategies, core and data
layers; never `fedlora.flower` or the CLI.
"""

from fedlora.engine.runner import RunResult, RunStopped, deterministic, run_experiment

__all__ = ["RunResult", "RunStopped", "deterministic", "run_experiment"]
