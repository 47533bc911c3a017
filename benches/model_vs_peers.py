"""Issue 31's comparison table (run by benches/model_vs_peers.sh, after it
ran this project's `model.*` criterion groups): reads those means, runs
llama.cpp's llama-bench over the requantized `--pure` F32, Q8_0 and Q4_0
GGUFs and transformers + PEFT over the model dequantized to f32, at 1 and
2 threads, and prints the table and every target's verdict.

* prefill: 128 tokens, last-row logits (what generation needs; for
  transformers also every row's, its default), tokens/s;
* decode: one token after the prompt, tokens/s (llama-bench: tg64);
* training: LoRA r=16 (alpha 32) on q_proj and v_proj, 8 sequences of 16
  tokens in one step, ms/token (ours: the `model_train` bench's step,
  forward + loss + backward; transformers: forward + backward + AdamW,
  batched [8, 16]).

Ours runs random weights at the real shapes (speed does not depend on the
values); the peers run the real weights.

    benches/model_vs_peers.py LLAMA_BENCH WORKDIR GGUF
"""
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRITERION = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "criterion")
LLAMA_BENCH, WORK, GGUF = sys.argv[1:4]
IDS = [(i * 997) % 49000 + 100 for i in range(128)]


def ours(group, bench):
    """Mean time of a criterion bench, in seconds."""
    with open(os.path.join(CRITERION, group, bench, "new", "estimates.json")) as f:
        return json.load(f)["mean"]["point_estimate"] * 1e-9


def llama_cpp(kind, threads):
    """llama-bench's mean tokens/s for pp128 and tg64."""
    out = subprocess.run(
        [LLAMA_BENCH, "-m", os.path.join(WORK, f"smollm2-{kind}.gguf"), "-t", str(threads), "-p", "128", "-n", "64",
         "-r", "5", "-o", "json"], capture_output=True, check=True, text=True).stdout
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == 128 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == 64 and r["n_prompt"] == 0)
    return pp, tg


def median_time(f, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def transformers_run(model, threads):
    torch.set_num_threads(threads)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        model(ids)
        full = 128 / median_time(lambda: model(ids), 5)
        last = 128 / median_time(lambda: model(ids, logits_to_keep=1), 5)
        out = model(ids, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(32):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = 32 / (time.perf_counter() - t)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.tensor(IDS).view(8, 16)

    def step():
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    train = median_time(step, 5) / 128 * 1e3
    peft_model.unload()
    model.eval()
    return full, last, decode, train


def main():
    rows, ratios = [], []
    folder, name = os.path.split(os.path.abspath(GGUF))
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    hf.hf_quantizer = None
    hf.is_quantized = False
    hf.eval()
    figures = {}
    for threads in (1, 2):
        for kind, label in (("F32", "f32"), ("Q8_0", "q8_0"), ("Q4_0", "q4_0")):
            g = f"model.smollm2_135m.{label}"
            pre, dec = 128 / ours(g, f"prefill_{threads}t"), 1 / ours(g, f"decode_{threads}t")
            fast = 1 / ours(g, f"decode_int8_{threads}t") if label != "f32" else None
            lpp, ltg = llama_cpp(kind, threads)
            figures[(label, threads)] = (pre, dec, fast, lpp, ltg)
        figures[("hf", threads)] = transformers_run(hf, threads)
        figures[("train", threads)] = ours("model_train.smollm2_135m.f32", f"lora_step_{threads}t") / 128 * 1e3
    print("| | 1t prefill | 1t decode | 2t prefill | 2t decode |")
    print("|---|---|---|---|---|")
    for label in ("f32", "q8_0", "q4_0"):
        a, b = figures[(label, 1)], figures[(label, 2)]
        rows.append(f"| ours {label} | {a[0]:.0f} | {a[1]:.1f} | {b[0]:.0f} | {b[1]:.1f} |")
        if a[2] is not None:
            rows.append(f"| ours {label}, --int8-activations | - | {a[2]:.1f} | - | {b[2]:.1f} |")
        rows.append(f"| llama.cpp {label} | {a[3]:.0f} | {a[4]:.1f} | {b[3]:.0f} | {b[4]:.1f} |")
    h1, h2 = figures[("hf", 1)], figures[("hf", 2)]
    rows.append(f"| transformers f32 (last-row logits) | {h1[0]:.0f} ({h1[1]:.0f}) | {h1[2]:.1f} | {h2[0]:.0f} ({h2[1]:.0f}) | {h2[2]:.1f} |")
    print("\n".join(rows))
    print()
    print("| LoRA training, 8 x 16 tokens, ms/token | 1 thread | 2 threads |")
    print("|---|---|---|")
    print(f"| ours (forward, loss, backward) | {figures[('train', 1)]:.2f} | {figures[('train', 2)]:.2f} |")
    print(f"| transformers + PEFT, batched (with AdamW) | {h1[3]:.2f} | {h2[3]:.2f} |")
    print()
    for t in (1, 2):
        f = figures[("f32", t)]
        h = figures[("hf", t)]
        ratios.append((f"f32 prefill {t}t / best peer", f[0] / max(f[3], h[1]), 1.1))
        ratios.append((f"f32 decode {t}t / best peer", f[1] / max(f[4], h[2]), 1.1))
        for label in ("q8_0", "q4_0"):
            q = figures[(label, t)]
            ratios.append((f"{label} int8 decode {t}t / llama.cpp", q[2] / q[4], 1.0))
        ratios.append((f"LoRA training {t}t / transformers batched", figures[("hf", t)][3] / figures[("train", t)], 1.2))
    for name, r, target in ratios:
        print(f"{name}: {r:.2f}  (target >= {target}: {'ok' if r >= target else 'MISSED'})")


if __name__ == "__main__":
    main()
