"""The data stage: read and validate records, render them with the chat template, mask, split, write."""
