"""Running models: llama.cpp for GGUF files, transformers for HF directories; chat and one-shot answers."""
