"""The contract and the maths: `contract` (LoraFactors, ClientSpec, ClientUpdate, Payload,
Strategy and the checks of an update), `linalg` (factored SVD, stacking), `norms` (Gram norms,
clipping), `robust` (the norm screen), `privacy` (clipping, noise and accounting of DP) and
`stats` (bootstrap CIs, paired tests).

The bottom layer: it imports torch and numpy (and Opacus lazily, for accounting) and nothing
else of fedlora's; no transformers, peft or flwr.
"""
