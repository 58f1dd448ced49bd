"""fedlora: federated fine-tuning of language models with heterogeneous LoRA adapters.

The contract (`LoraFactors`, `ClientSpec`, `ClientUpdate`, `Payload`, `Strategy`) is the
extension point for new methods; `fedlora.strategies` holds the methods and their registry.
"""

from fedlora.core.contract import (
    BOTH,
    Adapter,
    ClientSpec,
    ClientUpdate,
    FedLoraError,
    LoraFactors,
    Payload,
    Strategy,
    init_lora,
    init_lora_A,
    payload_nbytes,
    update_nbytes,
    validate_updates,
)

__all__ = [
    "BOTH",
    "Adapter",
    "ClientSpec",
    "ClientUpdate",
    "FedLoraError",
    "LoraFactors",
    "Payload",
    "Strategy",
    "init_lora",
    "init_lora_A",
    "payload_nbytes",
    "update_nbytes",
    "validate_updates",
]
__version__ = "0.1.0"
