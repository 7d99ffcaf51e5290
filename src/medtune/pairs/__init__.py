"""The pairs stage (stage.py): preference pairs sampled from a model and graded by answer keys."""
