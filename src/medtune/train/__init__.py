"""The LoRA training stage."""
