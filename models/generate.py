"""Text generation: greedy or sampled (temperature, top-k, top-p), with or without the KV cache."""
import torch

__all__ = ["generate", "generate_ids", "sample_next_token"]


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


@torch.no_grad()
def generate_ids(model, prompt_ids, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_ids=(), use_cache: bool = True) -> list[int]:
    """New token ids after `prompt_ids` (a list), ending before the first id in `stop_ids`.

    With use_cache the prompt is run once and each new token alone against the KV cache;
    without it the whole sequence is run again at every step (the reference for the cache).
    The model is put in eval mode for the call and restored afterwards.
    """
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt")
    device = model.model.norm.weight.device  # the layers' (the embeddings may be in host memory)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = set(stop_ids)
    was_training = model.training
    model.eval()
    try:
        sequence = torch.tensor([prompt_ids], device=device)  # (1, T)
        cache = model.new_kv_cache(1, len(prompt_ids) + max_new_tokens) if use_cache else None
        step_input = sequence
        new: list[int] = []
        for _ in range(max_new_tokens):
            hidden = model.model(step_input, kv_cache=cache)  # (1, T, hidden)
            logits = model.lm_head(hidden[0, -1])  # (V,)
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if token in stop_ids:
                break
            new.append(token)
            next_token = torch.tensor([[token]], device=device)
            sequence = torch.cat((sequence, next_token), dim=1)
            step_input = next_token if use_cache else sequence
        return new
    finally:
        model.train(was_training)


def generate(model, tok, prompt_or_messages, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, use_cache: bool = True) -> str:
    """The model's continuation of a prompt string, or its reply to a list of chat messages.

    A string is encoded as is (with bos when the tokenizer's convention adds one); messages are
    rendered with the tokenizer's chat template and a generation prompt. Generation stops at
    any of `tok.stop_ids`; the returned text excludes the prompt and the stop token.
    """
    if isinstance(prompt_or_messages, str):
        prompt_ids = tok.encode(prompt_or_messages, add_bos=tok.add_bos)
    else:
        prompt_ids = tok.encode(tok.apply_chat_template(prompt_or_messages, add_generation_prompt=True))
    new = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, tok.stop_ids, use_cache)
    return tok.decode(new, skip_special=True)
