"""Loads the adapter `peft finetune` wrote over SmolLM2's Q4_1 GGUF into
transformers + PEFT (transformers dequantizes the GGUF to f32) and compares
the logits of a chat prompt with `peft forward --out`'s:

    peft forward --model MODEL.gguf --adapter OUT/adapter \
        --chat "Tell me a programming joke." --out /tmp/ours.safetensors
    python check_with_peft.py MODEL.gguf OUT/adapter /tmp/ours.safetensors

Prints the largest absolute and relative differences (relative to the
largest |logit|) and whether the argmax agrees at every position.
"""
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path, adapter, ours_path = sys.argv[1:4]
folder, name = os.path.split(os.path.abspath(gguf_path))
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).eval()
messages = [{"role": "user", "content": "Tell me a programming joke."}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0]
ours = load_file(ours_path)["logits"][0]
assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
diff = (ours - theirs).abs().max().item()
scale = theirs.abs().max().item()
print(f"tokens {len(ids)}: max |diff| {diff:.3e}, relative {diff / scale:.3e}, "
      f"argmax equal at every position: {bool((ours.argmax(-1) == theirs.argmax(-1)).all())}")
