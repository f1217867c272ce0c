"""A minimal Llama, checkpoint loaders, tokenizers, chat templates and generation.

    cfg = models.LlamaConfig.preset("llama3.2-1b")       # or LlamaConfig.from_hf_config(folder)
    model = models.Llama(cfg)                            # plain nn.Module, HF module names
    model = models.Llama.from_pretrained(path, dtype=torch.bfloat16, device="cuda", quantize="nf4")
    #   path: HF folder (sharded or not), .gguf file, or *-bnb-4bit folder; streamed, see models.load
    logits = model(ids, attention_mask=None, position_ids=None, kv_cache=None, document_ids=None)
    hidden = model.model(ids, ...)                       # (B, T, hidden), before lm_head
    tok = models.Tokenizer.from_pretrained(path)         # tokenizer.model, tokenizer.json or .gguf
    ids, assistant_mask = tok.encode_chat(messages)      # chat template (llama2, llama3, chatml)
    text = models.generate(model, tok, messages_or_prompt, max_new_tokens=128, temperature=0.0)
    models.save_pretrained(model, folder)                # HF folder (bitsandbytes layout if quantized)
    path = models.fetch_smollm2()                        # the real test model, SmolLM2-135M-Instruct
    models.keep_embeddings_on_host(model)                # frozen embeddings and head in host memory
    model.model.checkpoint_offload = models.CheckpointOffload()  # checkpointed inputs in host memory
"""
from models.chat import ChatFormat
from models.fetch import FetchError, fetch_smollm2
from models.generate import generate, generate_ids
from models.llama import KVCache, Llama, LlamaConfig
from models.offload import CheckpointOffload, HostEmbedding, HostHead, keep_embeddings_on_host
from models.save import save_pretrained, save_safetensors_folder
from models.tokenizer import Tokenizer

__all__ = ["Llama", "LlamaConfig", "KVCache", "Tokenizer", "ChatFormat", "generate", "generate_ids",
           "fetch_smollm2", "FetchError", "save_pretrained", "save_safetensors_folder", "keep_embeddings_on_host",
           "HostEmbedding", "HostHead", "CheckpointOffload"]
