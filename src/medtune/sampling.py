"""Sampling defaults, one place for all: the config's `chat` section, `medtune chat` and `serve` without a config,
the server's per-request defaults and the engines' context size. A run's `chat` values (these, unless the config
says otherwise) reach the Ollama Modelfile and the merged model's generation_config.
"""

TEMPERATURE = 0.7
TOP_P = 0.9
MAX_TOKENS = 1024  # most new tokens in one reply
N_CTX = 4096  # context window a GGUF model is opened with (tokens)


def context_size(config: object) -> int:
    """The context an HF model is run with: its trained positions, or N_CTX when its config does not say."""
    return getattr(config, "max_position_embeddings", None) or N_CTX
