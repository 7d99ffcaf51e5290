"""The merge stage (stage.py): a LoRA adapter merged into its base, written as a self-contained HF directory."""
