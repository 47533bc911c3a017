#!/usr/bin/env python3
"""Writes the seed of the gguf_file target (run from peft-faer/fuzz): a
small GGUF v3 file in llama.cpp's layout, with the llama.* keys of a
one-layer model, a string array, and three tensors (Q4_K, Q4_1, F32),
each at a multiple of the 32-byte alignment."""
import random
import struct

random.seed(11)


def s(text):
    b = text.encode()
    return struct.pack('<Q', len(b)) + b


def kv(key, ty, payload):
    return s(key) + struct.pack('<I', ty) + payload


meta = [
    kv("general.architecture", 8, s("llama")),
    kv("llama.embedding_length", 4, struct.pack('<I', 256)),
    kv("llama.feed_forward_length", 4, struct.pack('<I', 512)),
    kv("llama.block_count", 4, struct.pack('<I', 1)),
    kv("llama.attention.head_count", 4, struct.pack('<I', 4)),
    kv("llama.attention.head_count_kv", 4, struct.pack('<I', 2)),
    kv("llama.rope.freq_base", 6, struct.pack('<f', 10000.0)),
    kv("llama.attention.layer_norm_rms_epsilon", 6, struct.pack('<f', 1e-5)),
    kv("tokenizer.ggml.tokens", 9, struct.pack('<IQ', 8, 3) + s("a") + s("b") + s("c")),
]


def q4_k_block():  # d, dmin (f16 0.01, 0.005), 12 scale bytes, 128 nibble bytes
    return struct.pack('<HH', 0x211F, 0x1D1F) + bytes(random.randrange(256) for _ in range(140))


def q4_1_block():  # d 0.25, m -1.0, 16 nibble bytes
    return struct.pack('<HH', 0x3400, 0xBC00) + bytes(random.randrange(256) for _ in range(16))


tensors = [
    ("blk.0.attn_q.weight", [256, 2], 12, q4_k_block() + q4_k_block()),
    ("token_embd.weight", [256, 3], 3, b"".join(q4_1_block() for _ in range(24))),
    ("blk.0.attn_norm.weight", [8], 0, struct.pack('<8f', *[1.0] * 8)),
]
infos, data = b"", b""
for name, ne, ty, raw in tensors:
    data += b"\0" * (-len(data) % 32)
    infos += s(name) + struct.pack('<I', len(ne)) + b"".join(struct.pack('<Q', n) for n in ne)
    infos += struct.pack('<IQ', ty, len(data))
    data += raw
head = b"GGUF" + struct.pack('<IQQ', 3, len(tensors), len(meta)) + b"".join(meta) + infos
head += b"\0" * (-len(head) % 32)
open("seeds/gguf_file/tiny.gguf", "wb").write(head + data)
