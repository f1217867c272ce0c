"""A minimal Llama, checkpoint loaders, tokenizers, chat templates and generation."""
from models.chat import ChatFormat
from models.fetch import FetchError, fetch_smollm2
from models.generate import generate, generate_ids
from models.llama import KVCache, Llama, LlamaConfig
from models.save import save_pretrained, save_safetensors_folder
from models.tokenizer import Tokenizer

__all__ = ["Llama", "LlamaConfig", "KVCache", "Tokenizer", "ChatFormat", "generate", "generate_ids",
           "fetch_smollm2", "FetchError", "save_pretrained", "save_safetensors_folder"]
