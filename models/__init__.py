"""A minimal Llama, checkpoint loaders, tokenizers, chat templates and generation."""
