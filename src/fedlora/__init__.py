"""fedlora: federated fine-tuning with heterogeneous LoRA."""
