"""A researcher's own Flower app: their model and data, a fedlora strategy and client."""
