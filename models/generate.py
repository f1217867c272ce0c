"""Text generation: greedy or sampled (temperature, top-k, top-p), with or without the KV cache.

Note [decoding in a CUDA graph]
    A decoding step runs the whole model on one token: at Llama-3.1-8B some 500 kernels, most of
    them tiny, whose launches from Python cost the host more than the GPU's work (an NF4 GEMV
    from Triton costs ~68 us of host time, benchmarks/RESULTS.md). On CUDA the step is captured
    once per call as a graph and replayed per token:
    - the prompt runs eagerly (one forward pass of T tokens);
    - the step's inputs are device tensors: the token's embedding (looked up outside the graph,
      so an embedding table in host memory works too) and its position; the KV cache writes at
      that position and attention masks the slots after it (KVCache.positions);
    - two eager steps at the next free position warm up what must not happen in a capture
      (Triton autotuning, lazy state); the real step overwrites what they wrote;
    - autocast runs without its weight-cast cache in the capture (cached casts would be freed
      when the caller's autocast region ends, under the graph's feet);
    - sampling stays on the host (one sync per token, as before).
"""
import contextlib
import warnings

import torch

__all__ = ["generate", "generate_ids", "sample_next_token", "GraphedDecoder"]


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> int:
    """The next token id from logits (V,).

    temperature <= 0: argmax. Otherwise softmax(logits / temperature) restricted to the top_k
    most likely tokens (top_k > 0) and to the smallest set of most likely tokens whose
    probabilities sum to at least top_p (top_p < 1), renormalised and sampled.
    """
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # keeps the first always
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class GraphedDecoder:
    """One decoding step of batch 1 (a token against `cache`) as a CUDA graph; Note [decoding in a
    CUDA graph]. `step(token, position)` returns the (V,) logits (a tensor the next step reuses)."""

    def __init__(self, model, cache, first_position: int):
        self.model, self.cache = model, cache
        embed = model.model.embed_tokens
        self.embeds = torch.zeros((1, 1, model.config.hidden_size), dtype=embed.weight.dtype,
                                  device=model.model.norm.weight.device)
        self.position = torch.full((1,), first_position, dtype=torch.long, device=self.embeds.device)
        cache.positions = self.position
        with self._autocast():
            for _ in range(2):  # warm-up at first_position: the first real step overwrites it
                self._run()
            torch.cuda.synchronize(self.embeds.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()

    def _autocast(self):
        if not torch.is_autocast_enabled("cuda"):
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)

    def _run(self) -> torch.Tensor:
        hidden = self.model.model(inputs_embeds=self.embeds, kv_cache=self.cache)  # (1, 1, hidden)
        return self.model.lm_head(hidden[0, -1])  # (V,)

    def step(self, token: int, position: int) -> torch.Tensor:
        table = self.model.model.embed_tokens
        self.embeds.copy_(table(torch.tensor([[token]], device=table.weight.device)))
        self.position.fill_(position)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate_ids(model, prompt_ids, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_ids=(), use_cache: bool = True,
                 cuda_graph: bool | None = None) -> list[int]:
    """New token ids after `prompt_ids` (a list), ending before the first id in `stop_ids`.

    With use_cache the prompt is run once and each new token alone against the KV cache;
    without it the whole sequence is run again at every step (the reference for the cache).
    cuda_graph (CUDA with the cache only; None: when at least 8 new tokens are asked for) replays
    each step from a CUDA graph (Note [decoding in a CUDA graph]).
    The model is put in eval mode for the call and restored afterwards.
    """
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt")
    device = model.model.norm.weight.device  # the layers' (the embeddings may be in host memory)
    ids_device = model.model.embed_tokens.weight.device
    if cuda_graph is None:
        cuda_graph = max_new_tokens >= 8
    cuda_graph = bool(cuda_graph) and use_cache and device.type == "cuda"
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = set(stop_ids)
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(1, len(prompt_ids) + max_new_tokens) if use_cache else None
    try:
        sequence = torch.tensor([prompt_ids], device=ids_device)  # (1, T)
        step_input = sequence
        decoder = None
        new: list[int] = []
        for _ in range(max_new_tokens):
            if decoder is not None:
                logits = decoder.step(new[-1], len(prompt_ids) + len(new) - 1)
            else:
                hidden = model.model(step_input, kv_cache=cache)  # (1, T, hidden)
                logits = model.lm_head(hidden[0, -1])  # (V,)
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if token in stop_ids:
                break
            new.append(token)
            if cuda_graph and decoder is None and len(new) < max_new_tokens:
                try:
                    decoder = GraphedDecoder(model, cache, first_position=cache.length)
                except RuntimeError as error:  # an op that cannot be captured: decode eagerly
                    cache.positions, cuda_graph = None, False
                    warnings.warn(f"generate: capturing the decoding step failed ({str(error).splitlines()[0]}); "
                                  f"decoding eagerly")
            next_token = torch.tensor([[token]], device=ids_device)
            sequence = torch.cat((sequence, next_token), dim=1)
            step_input = next_token if use_cache else sequence
        return new
    finally:
        model.train(was_training)


def generate(model, tok, prompt_or_messages, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, use_cache: bool = True,
             cuda_graph: bool | None = None) -> str:
    """The model's continuation of a prompt string, or its reply to a list of chat messages.

    A string is encoded as is (with bos when the tokenizer's convention adds one); messages are
    rendered with the tokenizer's chat template and a generation prompt. Generation stops at
    any of `tok.stop_ids`; the returned text excludes the prompt and the stop token.
    """
    if isinstance(prompt_or_messages, str):
        prompt_ids = tok.encode(prompt_or_messages, add_bos=tok.add_bos)
    else:
        prompt_ids = tok.encode(tok.apply_chat_template(prompt_or_messages, add_generation_prompt=True))
    new = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, tok.stop_ids, use_cache,
                       cuda_graph)
    return tok.decode(new, skip_special=True)
