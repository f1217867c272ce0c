"""LoRA for any PyTorch model: `import lora; lora.wrap(model, r=16)`."""
