"""PyTorch + PEFT on the workload of `gpo bench train`: what a user would otherwise run.

One LoRA training step = forward + backward + AdamW on B sequences of T random token ids, LoRA
rank r (alpha 2r, no dropout) on q, k, v, o, gate, up and down; the frozen weights are the GGUF's,
dequantised by transformers; float32 on the CPU, bfloat16 on CUDA; no gradient checkpointing.
Prints a line per step and a final line `RESULT {json}` with the median step time, tokens/s and
peak memory (resident set on the CPU, allocated device memory on CUDA). `gpo bench train` runs it
when it finds the environment that scripts/peft-env.sh creates.

    python scripts/peft_train.py --gguf MODEL.gguf [-b 4 -t 256 -r 16 --steps 3 --device cpu]
"""
import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("-b", type=int, default=4)
    p.add_argument("-t", type=int, default=256)
    p.add_argument("-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    folder, name = os.path.split(os.path.abspath(a.gguf))
    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).to(a.device)
    m = get_peft_model(m, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules=TARGETS))
    m.train()
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(7)
    vocab = m.config.vocab_size
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.steps + 1):  # step 0 warms up
        x = torch.randint(0, vocab, (a.b, a.t), generator=gen).to(a.device)
        sync()
        t0 = time.perf_counter()
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        print(f"step {i}: {dt:.2f} s" + (" (warm-up)" if i == 0 else ""), flush=True)
        if i:
            times.append(dt)
    med = statistics.median(times)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({
        "step_s": med, "tokens_per_s": a.b * a.t / med, "peak_mib": peak, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "device": a.device, "dtype": str(dtype).removeprefix("torch."),
    }), flush=True)


if __name__ == "__main__":
    main()
