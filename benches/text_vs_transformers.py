"""SmolLM2-135M-Instruct beside transformers + PEFT on torch, same machine,
same shapes, at 1 and 2 threads, rounds alternating between the systems;
medians printed as a table. Not part of CI; the README's figures come from
it.

* prefill: a 128-token prompt, tokens/s to the first token's logits;
* decode: 64 greedy tokens after it (EOS ignored), tokens/s;
* training: LoRA r=16 (alpha 32) on q_proj and v_proj, batches of 8
  sequences of 64 tokens (the jokes demo data, packed), tokens/s over 6
  optimizer steps after one warmup step.

Ours runs the Q4_1 GGUF as stored (`peft generate --json`, `peft finetune
--data --json`); transformers loads the same GGUF dequantized to f32 (it
has no CPU kernels for GGUF's block types), with PEFT's LoRA and torch's
AdamW.

    python -m venv venv && venv/bin/pip install torch peft==0.21.2 transformers==5.25.0 gguf
    cargo build --release --bin peft
    venv/bin/python benches/text_vs_transformers.py [ROUNDS]
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "target/models/SmolLM2-135M-Instruct.Q4_1.gguf")
PEFT = os.path.join(ROOT, "target/release/peft")
DATA = os.path.join(ROOT, "peft-faer/examples/jokes/jokes.jsonl")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
PROMPT = ",".join(str((i * 997) % 49000 + 100) for i in range(128))
SEQ, BATCH, STEPS = 64, 8, 6


TEXT = "The quick brown fox jumps over the lazy dog. " * 13


def ours_generate(threads):
    text = TEXT
    r = subprocess.run(
        [PEFT, "generate", "--model", MODEL, "--prompt", text, "--max-new-tokens", "65", "--ignore-eos",
         "--threads", str(threads), "--json"], capture_output=True, check=True)
    doc = json.loads(r.stdout)
    return doc["prefill_tokens_per_second"], doc["decode_tokens_per_second"], len(doc["prompt_ids"])


def ours_train(threads):
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run(
            [PEFT, "finetune", "--model", MODEL, "--data", DATA, "--packing", "--max-len", str(SEQ),
             "--batch-size", str(BATCH), "--rank", "16", "--steps", str(STEPS + 1), "--threads", str(threads),
             "--lr", "1e-4", "--out", out, "--json"], capture_output=True, check=True)
        doc = json.loads(r.stdout)
    # One step's time is a warmup, as for torch: the rate over the others
    # is not separable from the JSON, so the whole run is counted.
    return (STEPS + 1) * BATCH * SEQ / doc["seconds"]


def load_hf():
    folder, name = os.path.split(MODEL)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    return tok, model


def hf_generate(tok, model, n_prompt):
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    assert ids.shape[1] == n_prompt, (ids.shape, n_prompt)
    with torch.no_grad():
        t = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill = ids.shape[1] / (time.perf_counter() - t)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(64):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        decode = 64 / (time.perf_counter() - t)
    return prefill, decode


def hf_train(tok, base):
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.train()
    stream = []
    for line in open(DATA):
        m = json.loads(line)["messages"]
        stream += tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for step in range(STEPS + 1):
        if step == 1:
            t = time.perf_counter()
        chunk = stream[step * BATCH * SEQ:(step + 1) * BATCH * SEQ]
        ids = torch.tensor(chunk).view(BATCH, SEQ)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    rate = STEPS * BATCH * SEQ / (time.perf_counter() - t)
    model.unload()
    return rate


def main():
    tok, model = load_hf()
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows = {"ours": [], "transformers": []}
        for _ in range(ROUNDS):
            p, d, n = ours_generate(threads)
            rows["ours"].append((p, d, ours_train(threads)))
            p2, d2 = hf_generate(tok, model, n)
            rows["transformers"].append((p2, d2, hf_train(tok, model)))
        for k, v in rows.items():
            results[(k, threads)] = [statistics.median(x) for x in zip(*v)]
    print("| system | threads | prefill 128 tok/s | decode tok/s | LoRA training tok/s |")
    print("|---|---|---|---|---|")
    for (k, threads), (p, d, tr) in sorted(results.items(), key=lambda x: (x[0][1], x[0][0])):
        print(f"| {k} | {threads} | {p:.0f} | {d:.1f} | {tr:.0f} |")
    for threads in (1, 2):
        o, h = results[("ours", threads)], results[("transformers", threads)]
        print(f"ratio ours/transformers at {threads} thread(s): prefill {o[0] / h[0]:.2f}, "
              f"decode {o[1] / h[1]:.2f}, training {o[2] / h[2]:.2f}")


if __name__ == "__main__":
    main()
