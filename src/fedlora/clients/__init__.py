"""The client side: loading a model (`models`, `tiny`), hosting many adapters on one base
(`host`, `adapter_cache`, `base_weights`, `dense_modules`), where it computes (`device`),
training one client (`train`, with `local_steps` and DP-SGD in `dp_sgd`) and evaluating a
model (`evaluate`).

It may import `fedlora.core`, `fedlora.strategies` (the client-side maths of a method, e.g.
LoRA-A2's slot selection) and `fedlora.data`; never the federation, the engines or the CLI.
"""
