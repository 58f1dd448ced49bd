"""fedlora on Flower: codec, strategy adapter, ServerApp and ClientApp (see docs/flower.md)."""
