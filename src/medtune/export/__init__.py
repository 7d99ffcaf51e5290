"""The export stage: merged HF model -> GGUF F16 -> llama.cpp quantizations, each file verified."""
