#!/usr/bin/env python3
"""Writes the seeds of the quantized_storage and cli_args targets (run from
peft-faer/fuzz): a small safetensors file with one Q8_0, one Q4_0 and one
int8 matrix (this crate's `peft.storage.<name>` metadata) and an f32
vector, and a few valid `peft` command lines, arguments separated by NUL."""
import json
import random
import struct

random.seed(7)


def q8_row():  # one Q8_0 block: f16 scale 0.5, then 32 int8
    return struct.pack('<H', 0x3800) + bytes(random.randrange(256) for _ in range(32))


def q4_row():  # one Q4_0 block: f16 scale 0.25, then 16 bytes of nibbles
    return struct.pack('<H', 0x3400) + bytes(random.randrange(256) for _ in range(16))


def i8_row(cols):  # an int8 row: f32 scale, then cols int8
    return struct.pack('<f', 0.01) + bytes(random.randrange(256) for _ in range(cols))


tensors = [
    ("w.q8", "U8", [2, 34], q8_row() + q8_row(), ("q8_0", [2, 32])),
    ("w.q4", "U8", [2, 18], q4_row() + q4_row(), ("q4_0", [2, 32])),
    ("w.i8", "U8", [2, 7], i8_row(3) + i8_row(3), ("int8", [2, 3])),
    ("b", "F32", [3], struct.pack('<3f', 1.0, -2.0, 0.5), None),
]
header, data, meta = {}, b"", {}
for name, dt, shape, raw, q in tensors:
    header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
    data += raw
    if q:
        meta["peft.storage." + name] = json.dumps({"format": q[0], "shape": q[1]}, separators=(",", ":"))
header["__metadata__"] = meta
h = json.dumps(header, separators=(",", ":")).encode()
open("seeds/quantized_storage/q8_q4_int8.safetensors", "wb").write(struct.pack('<Q', len(h)) + h + data)

cmds = [
    ["forward", "--model", "m", "--ids", "1,2,3", "--top", "5"],
    ["generate", "--model", "m", "--ids", "7", "--max-new-tokens", "4"],
    ["merge", "--base", "b.safetensors", "--adapter", "a:0.5", "--adapter", "c", "--out", "o", "--threads", "2",
     "--dtype", "q4_0"],
    ["combine", "--adapter", "a:0.7", "--adapter", "b:1e-3", "--combination", "dare_ties", "--density", "0.5",
     "--seed", "3", "--out", "o"],
    ["combine", "--adapter", "a", "--combination", "svd", "--svd-rank", "8", "--out", "o"],
    ["finetune", "--method", "lora", "--steps", "10", "--rank", "4", "--lr", "1e-3", "--threads", "2", "--seed", "1"],
    ["quantize", "--base", "b", "--out", "o", "--format", "int8"],
]
for i, c in enumerate(cmds):
    open(f"seeds/cli_args/{c[0]}-{i}", "wb").write(b"\0".join(a.encode() for a in c))
