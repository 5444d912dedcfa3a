"""Causal language models (``contract.TASK_TEXT_GENERATION``): loading (Hugging Face
directories, GGUF files, compressed artifacts), compression behind a perplexity gate, and
the OpenAI-compatible runtime."""
