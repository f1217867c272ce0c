"""The peer side of benchmarks/train.py: one QLoRA training run with HF transformers + PEFT + bitsandbytes.

Run as a separate process (benchmarks/train.py starts it) so that its memory peak is its own and
this repository's `kernels` package cannot shadow the PyPI package of that name that transformers
looks for. It imports nothing from this repository.

    python3 benchmarks/train_peer.py '<json args>'    -> prints one JSON line of results

The recipe is the one REFERENCE.md describes: NF4 + double quant (bitsandbytes Linear4bit,
compute dtype bf16), LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, gradient checkpointing
(non-reentrant), SDPA attention, bitsandbytes PagedAdamW32bit, bf16 autocast, gradient clipping
at 1.0, random weights. recipe "bf16" keeps non-quantized weights in bf16; recipe "tutorial"
adds peft.prepare_model_for_kbit_training (norms, embeddings and head upcast to fp32).
"""
import json
import sys
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(hf_config: dict, recipe: str):
    import bitsandbytes as bnb
    import peft
    import transformers

    config = transformers.LlamaConfig(**hf_config)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.LlamaForCausalLM(config)
        torch.set_default_dtype(previous)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", device="meta")
                weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", module=q)
                q.weight = weight._quantize("cuda")
                setattr(module, child_name, q)
                del child
    torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True
    if recipe == "tutorial":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                  task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora_config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    return model, params, optimizer


def main(args: dict) -> dict:
    model, params, optimizer = build(args["hf_config"], args["recipe"])
    model.train()
    B, T = args["batch"], args["seq"]
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, args["hf_config"]["vocab_size"], (B, T), device="cuda", generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # peaks of training, warm-up included (as for ours)
    for _ in range(args["warmup"]):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"impl": f"hf+peft+bnb ({args['recipe']})", "step_s": median, "tokens_per_s": B * T / median,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "loss": float(loss)}


if __name__ == "__main__":
    try:
        result = main(json.loads(sys.argv[1]))
    except torch.cuda.OutOfMemoryError as e:
        result = {"error": f"out of memory: {str(e).splitlines()[0]}"}
    print("RESULT " + json.dumps(result), flush=True)
