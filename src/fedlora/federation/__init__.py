"""One federation core under both engines: the experiment's configuration (`config`, with
`resources` for the clients' ranks), building a federation from it (`build`: data, split,
model host, client specs, strategy, privacy, evaluation sets) and one round's steps (`rounds`:
sample, configure, accept each reply, screen, aggregate, account and write the round row).

The in-process engine and the Flower engine both call these functions; an engine adds only
how clients are reached and where state is kept. It may import the clients, strategies, core
and data layers; never an engine or the CLI.
"""
