#!/usr/bin/env python3
"""Build the tiny ONNX models meshgate's inference tests run on a real ONNX Runtime session.

Usage: make-test-models.py OUTDIR

Writes, deterministically (fixed seeds, fixed vocabularies):
  OUTDIR/tiny-embed/{model.onnx,tokenizer.json,reference.json}
      a 2-layer BERT-style encoder with the all-MiniLM-L6-v2 interface
      (input_ids, attention_mask, token_type_ids -> last_hidden_state) and a WordPiece tokenizer.
  OUTDIR/tiny-classify/{model.onnx,tokenizer.json,reference.json}
      the same encoder shape with a classifier head (mean pooling, linear, softmax) in one graph,
      outputs last_hidden_state and probabilities over five task labels.
  OUTDIR/tiny-chat/{model.onnx,tokenizer.json,reference.json}
      a 2-layer Llama-style decoder (RMSNorm, rotary positions, grouped-query attention, SwiGLU)
      with random weights and the SmolLM2 / optimum interface (input_ids, attention_mask,
      position_ids, past_key_values.{i}.key/value -> logits, present.{i}.key/value) and a
      byte-level BPE tokenizer with ChatML markers.
  OUTDIR/manifest.json
      the same manifest format the real models use (see MANIFEST below and the inference crate).
  OUTDIR/smollm2-shaped/{manifest.json,tiny-smollm2/...}
      a models directory of its own (so the tiny models above stay the only ones every test
      loads) holding tiny-smollm2: a tiny random decoder served exactly as fetch-models.sh serves
      SmolLM2-135M-Instruct (scripts/models/convert_smollm2.py): its tokenizer pipeline (digits
      split one by one, then byte-level BPE, control tokens as special tokens at ids 0-2), ChatML with SmolLM2's default system prompt, its end tokens and manifest fields. The chat
      test of services/inference/tests/real_models.rs runs on it in every scripts/test.sh run, and
      on SmolLM2 itself when it was fetched.
  OUTDIR/cascade/{manifest.json,tiny-encoder/...,tiny-guard/...,tiny-topic/...}
      a models directory of its own holding classifier cascades as fetch-models.sh builds them
      (scripts/models/train_classifiers.py): tiny-encoder (tiny-embed's encoder) and two
      classifiers over it, each a head.json over its sentence embedding and a first_stage.bin
      (hashed n-grams of the token ids, scripts/models/ngram.py) trained on a few labelled
      sentences, with thresholds placed so that the reference sentences exercise both stages.

Before writing, the script checks with onnxruntime that the decoder really uses its KV cache
(logits of an incremental run equal a full recompute) and records references the Rust tests
compare against: greedy token ids for fixed chat prompts, pooled embeddings and class
probabilities for fixed sentences.

Idempotent: when every file listed in OUTDIR/manifest.json exists with the recorded sha256 and the
manifest was written by this exact script, nothing is rebuilt.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
# The decoder graph and the greedy reference loop are the ones the real SmolLM2 conversion uses.
import llama_onnx  # noqa: E402
import ngram  # noqa: E402
from llama_onnx import NEG_INF, Graph  # noqa: E402

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "I am fine, thank you. What can I do for you?",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "Write a function that adds two numbers in Rust: fn add(a: i32, b: i32) -> i32 { a + b }",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    "Café, naïve, über, résumé, façade, jalapeño.",
    "日本語のテキスト。こんにちは世界。",
    "Emoji: 🙂 🚀 ✨ — and quotes “like this”.",
    "system user assistant tool",
    "You are a helpful assistant. Answer briefly and precisely.",
    "Once upon a time there was a little model that generated tokens one by one.",
]

EMBED_WORDS = sorted(
    {
        w
        for line in [
            "the a an of to and in is it that for on with as was are be this by at from",
            "cat cats dog dogs fox bird fish sat mat sun moon sky blue red green quick brown lazy",
            "weather today rain sunny cold hot paris france london japan tokyo city capital",
            "model models token tokens embedding embeddings vector search query document text",
            "hello world good morning night thank you please love like hate run runs running",
            "rust python code function number numbers one two three four five",
        ]
        for w in line.split()
    }
)
EMBED_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

CLASSIFY_LABELS = ["chat", "code", "math", "creative", "reasoning"]

CHAT_REFERENCE_PROMPTS = [
    [{"role": "user", "content": "Hello, world! How are you today?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [{"role": "user", "content": "Café 日本 🙂"}],
]
CHAT_REFERENCE_MAX_TOKENS = 24

# What scripts/models/convert_smollm2.py reads from the SmolLM2 GGUF and manifest.py writes.
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_SHAPED_DIR = "smollm2-shaped"
SMOLLM2_REFERENCE_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name 3 numbers: 12, 345 and 2024."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
]
EMBED_REFERENCE_SENTENCES = [
    "the quick brown fox",
    "Hello world, good morning!",
    "embeddings of a search query",
    "zebra xylophone",  # out of vocabulary: exercises WordPiece pieces and [UNK]
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checked(model):
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------- tokenizers


def build_chat_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=2,
        special_tokens=CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CHAT_CORPUS * 4, trainer=trainer)
    return tok


def build_smollm2_shaped_tokenizer():
    """The pipeline of convert_smollm2.build_tokenizer (SmolLM2's GGUF `smollm` pre-tokenizer: digits
    one by one, then the GPT-2 pattern; control tokens matched whole as special tokens), over a BPE
    trained here instead of SmolLM2's vocabulary. Control tokens get ids 0-2, as in SmolLM2."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=2,
        special_tokens=CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((CHAT_CORPUS + [SMOLLM2_SYSTEM_PROMPT]) * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS])
    return tok


def build_embed_tokenizer(context_length):
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = {}
    for piece in EMBED_SPECIALS + chars + ["##" + c for c in chars] + EMBED_WORDS:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(EMBED_SPECIALS)
    # Like the published all-MiniLM-L6-v2 tokenizer.json: fixed-length padding and truncation, which
    # the service must override with batch-longest padding.
    tok.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]", length=context_length)
    tok.enable_truncation(max_length=context_length)
    return tok


# ---------------------------------------------------------------- tiny-embed


def build_embed_model(vocab_size, hidden, heads, layers, ffn, context_length, seed, labels=None):
    """The encoder; with `labels`, also a classifier head over its mean-pooled output."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    w = lambda *shape, scale=0.2: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731

    g = Graph("tiny-embed")
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = g.input("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    types = g.input("token_type_ids", TensorProto.INT64, ["batch", "sequence"])

    seq = g.dim(ids, 1)
    positions = g.op("Range", [g.i64(0), g.op("Squeeze", [seq, g.i64([0])]), g.i64(1)])
    x = g.op("Gather", [g.const(w(vocab_size, hidden, scale=1.0), "word_embeddings"), ids])
    x = g.op("Add", [x, g.op("Gather", [g.const(w(context_length, hidden, scale=0.5), "position_embeddings"), positions])])
    x = g.op("Add", [x, g.op("Gather", [g.const(w(2, hidden, scale=0.5), "token_type_embeddings"), types])])

    def layer_norm(v):
        return g.op("LayerNormalization", [v, g.f32(np.ones(hidden)), g.f32(np.zeros(hidden))], axis=-1, epsilon=1e-12)

    x = layer_norm(x)
    # Keys at padded positions are masked out: [batch, 1, 1, seq].
    key_ok = g.op("Cast", [g.op("Unsqueeze", [mask, g.i64([1, 2])])], to=TensorProto.BOOL)
    split_heads = g.i64([0, 0, heads, head_dim])
    for _ in range(layers):
        def proj(v):
            return g.op("Add", [g.op("MatMul", [v, g.f32(w(hidden, hidden))]), g.f32(w(hidden, scale=0.02))])

        def heads_first(v):
            return g.op("Transpose", [g.op("Reshape", [v, split_heads])], perm=[0, 2, 1, 3])

        q, k, v = heads_first(proj(x)), heads_first(proj(x)), heads_first(proj(x))
        scores = g.op("Div", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), g.f32(np.sqrt(head_dim))])
        scores = g.op("Where", [key_ok, scores, g.f32(NEG_INF)])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.i64([0, 0, hidden])])
        x = layer_norm(g.op("Add", [x, proj(ctx)]))
        h = g.op("Add", [g.op("MatMul", [x, g.f32(w(hidden, ffn))]), g.f32(w(ffn, scale=0.02))])
        # Exact GELU: 0.5 * h * (1 + erf(h / sqrt(2))).
        gelu = g.op("Mul", [g.op("Mul", [h, g.f32(0.5)]), g.op("Add", [g.f32(1.0), g.op("Erf", [g.op("Div", [h, g.f32(np.sqrt(2.0))])])])])
        h = g.op("Add", [g.op("MatMul", [gelu, g.f32(w(ffn, hidden))]), g.f32(w(hidden, scale=0.02))])
        x = layer_norm(g.op("Add", [x, h]))
    g.op("Identity", [x], out="last_hidden_state")
    g.output("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    if labels is None:
        return checked(g.model("tiny BERT-style encoder with the all-MiniLM-L6-v2 interface, random weights"))

    # Mean pooling over the attention mask, then a linear head and softmax.
    mask_f = g.op("Cast", [g.op("Unsqueeze", [mask, g.i64([2])])], to=TensorProto.FLOAT)
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask_f]), g.i64([1])], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mask_f, g.i64([1])], keepdims=0), g.f32(1e-9)])
    logits = g.op("Add", [g.op("MatMul", [g.op("Div", [summed, count]), g.f32(w(hidden, len(labels), scale=1.0))]), g.f32(w(len(labels), scale=0.5))])
    g.op("Softmax", [logits], axis=-1, out="probabilities")
    g.output("probabilities", TensorProto.FLOAT, ["batch", len(labels)])
    return checked(g.model("tiny encoder with a classifier head (mean pooling, linear, softmax), random weights"))


# ---------------------------------------------------------------- tiny-chat


def build_chat_model(name, vocab_size, hidden, heads, kv_heads, layers, ffn, context_length, seed, eos_id, eos_bias):
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    w = lambda *shape, scale: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    scale = 1.0 / np.sqrt(hidden)
    weights = {"embed": w(vocab_size, hidden, scale=1.0)}
    for i in range(layers):
        weights[f"attn_norm.{i}"] = 1.0 + w(hidden, scale=0.1)
        weights[f"q.{i}"] = w(hidden, heads * head_dim, scale=scale)
        weights[f"k.{i}"] = w(hidden, kv_heads * head_dim, scale=scale)
        weights[f"v.{i}"] = w(hidden, kv_heads * head_dim, scale=scale)
        weights[f"o.{i}"] = w(heads * head_dim, hidden, scale=scale)
        weights[f"ffn_norm.{i}"] = 1.0 + w(hidden, scale=0.1)
        weights[f"gate.{i}"] = w(hidden, ffn, scale=scale)
        weights[f"up.{i}"] = w(hidden, ffn, scale=scale)
        weights[f"down.{i}"] = w(ffn, hidden, scale=1.0 / np.sqrt(ffn))
    weights["norm"] = 1.0 + w(hidden, scale=0.1)
    weights["lm_head"] = w(hidden, vocab_size, scale=3.0 / np.sqrt(hidden))
    # Random weights would almost never pick the end token; a fixed bias makes it a real competitor so
    # some reference prompts end with it and others run to max_tokens.
    bias = np.zeros(vocab_size, dtype=np.float32)
    bias[eos_id] = eos_bias
    weights["lm_bias"] = bias
    cfg = {"vocab": vocab_size, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "layers": layers, "context_length": context_length, "rope_theta": 10000.0, "rms_eps": 1e-5}
    model = llama_onnx.build(cfg, weights, name,
                             "tiny Llama-style decoder with the SmolLM2/optimum KV-cache interface, random weights")
    onnx.checker.check_model(model, full_check=True)
    return model


render_chatml = llama_onnx.render_chatml


def build_decoder(d, name, tok, reference_prompts, default_system, seed, context_length):
    """A tiny decoder over `tok` in directory d, with greedy references (checked against a full
    recompute) for reference_prompts rendered as the service renders them; the manifest entry,
    paths relative to d's parent."""
    os.makedirs(d, exist_ok=True)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id = tok.token_to_id("<|im_end|>")
    eos_ids = {eos_id, tok.token_to_id("<|endoftext|>")}
    layers, hidden, heads, kv_heads, ffn = 2, 64, 4, 2, 128
    head_dim = hidden // heads
    tok_path = os.path.join(d, "tokenizer.json")
    model_path = os.path.join(d, "model.onnx")
    tok.save(tok_path)

    prompts = [tok.encode(render_chatml(m, default_system)).ids for m in reference_prompts]
    # The smallest end-token bias (from a fixed ladder) under which at least one reference prompt
    # ends with the end token and at least one runs to max_tokens, so both finish paths have a
    # reference.
    for bias in [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]:
        model = build_chat_model(name, vocab_size, hidden, heads, kv_heads, layers, ffn, context_length, seed, eos_id,
                                 bias)
        with tempfile.TemporaryDirectory() as tmp:
            tmp_model = os.path.join(tmp, "model.onnx")
            onnx.save(model, tmp_model)
            runner = llama_onnx.GreedyRunner(tmp_model, layers, kv_heads, head_dim)
            runs = [runner.greedy(p, CHAT_REFERENCE_MAX_TOKENS, eos_ids) for p in prompts]
            reasons = {r[1] for r in runs}
            if reasons == {"stop", "length"} and all(len(r[0]) >= 3 for r in runs):
                for p, (tokens, _, step_logits) in zip(prompts, runs):
                    runner.check_cache_matches_recompute(name, p, tokens, step_logits)
                break
    else:
        raise SystemExit(f"{name}: no end-token bias gives both a 'stop' and a 'length' reference")

    onnx.save(model, model_path)
    reference = {
        "greedy": [
            {
                "messages": msgs,
                "prompt": render_chatml(msgs, default_system),
                "prompt_ids": p,
                "max_tokens": CHAT_REFERENCE_MAX_TOKENS,
                "completion_ids": tokens,
                "finish_reason": reason,
            }
            for msgs, p, (tokens, reason, _) in zip(reference_prompts, prompts, runs)
        ]
    }
    ref_path = os.path.join(d, "reference.json")
    with open(ref_path, "w") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
    entry = {
        "name": name,
        "task": "chat",
        "file": f"{name}/model.onnx",
        "sha256": sha256_file(model_path),
        "tokenizer": f"{name}/tokenizer.json",
        "tokenizer_sha256": sha256_file(tok_path),
        "context_length": context_length,
        "chat_template": "chatml",
    }
    if default_system is not None:
        entry["default_system_prompt"] = default_system
    entry.update({
        "eos_tokens": ["<|im_end|>", "<|endoftext|>"],
        "reference": f"{name}/reference.json",
        "reference_sha256": sha256_file(ref_path),
    })
    return entry


def build_chat(outdir):
    return build_decoder(os.path.join(outdir, "tiny-chat"), "tiny-chat", build_chat_tokenizer(), CHAT_REFERENCE_PROMPTS,
                         None, 1234, context_length=128)


def build_smollm2_shaped(outdir):
    """OUTDIR/smollm2-shaped: a models directory holding tiny-smollm2 (see the module doc)."""
    d = os.path.join(outdir, SMOLLM2_SHAPED_DIR)
    entry = build_decoder(os.path.join(d, "tiny-smollm2"), "tiny-smollm2", build_smollm2_shaped_tokenizer(),
                          SMOLLM2_REFERENCE_PROMPTS, SMOLLM2_SYSTEM_PROMPT, 1234, context_length=256)
    entry["source"] = "scripts/make-test-models.py: random weights, served as SmolLM2-135M-Instruct is"
    return entry


def build_encoder(outdir, name, seed, labels=None):
    """tiny-embed (labels None) or a tiny classifier over the same tokenizer and encoder shape."""
    d = os.path.join(outdir, name)
    os.makedirs(d, exist_ok=True)
    hidden, context_length = 32, 64
    tok = build_embed_tokenizer(context_length)
    tok_path = os.path.join(d, "tokenizer.json")
    model_path = os.path.join(d, "model.onnx")
    tok.save(tok_path)
    model = build_embed_model(tok.get_vocab_size(with_added_tokens=True), hidden, 4, 2, 64, context_length, seed, labels)
    onnx.save(model, model_path)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    tok.no_padding()

    def run(ids, mask):
        ids = np.array(ids, dtype=np.int64)
        mask = np.array(mask, dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden_state = sess.run(["last_hidden_state"], feed)[0]
        pooled = (hidden_state * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        vec = (pooled / np.linalg.norm(pooled, axis=1, keepdims=True))[0]
        probs = sess.run(["probabilities"], feed)[0][0] if labels else None
        return vec, probs

    def encode(text):
        enc = tok.encode(text)
        vec, probs = run([enc.ids], [enc.attention_mask])
        return vec, probs, enc.ids

    # Padding must not change a sentence's result: the model masks padded keys.
    vec, probs, ids = encode(EMBED_REFERENCE_SENTENCES[0])
    padded_vec, padded_probs = run([ids + [0] * 5], [[1] * len(ids) + [0] * 5])
    if not np.allclose(padded_vec, vec, atol=1e-5) or (labels and not np.allclose(padded_probs, probs, atol=1e-5)):
        raise SystemExit(f"{name}: padding changes the output")

    reference = {"embeddings": [], "classifications": []}
    for text in EMBED_REFERENCE_SENTENCES:
        vec, probs, ids = encode(text)
        if labels:
            reference["classifications"].append({"text": text, "probabilities": [round(float(p), 7) for p in probs]})
        else:
            reference["embeddings"].append({"text": text, "input_ids": ids, "vector": [round(float(x), 7) for x in vec]})
    ref_path = os.path.join(d, "reference.json")
    with open(ref_path, "w") as f:
        json.dump({k: v for k, v in reference.items() if v}, f, indent=1)
    entry = {
        "name": name,
        "task": "classification" if labels else "embeddings",
        "file": f"{name}/model.onnx",
        "sha256": sha256_file(model_path),
        "tokenizer": f"{name}/tokenizer.json",
        "tokenizer_sha256": sha256_file(tok_path),
        "context_length": context_length,
    }
    if labels:
        entry["labels"] = labels
    else:
        entry.update({"dims": hidden, "pooling": "mean", "normalize": True})
    entry.update({"reference": f"{name}/reference.json", "reference_sha256": sha256_file(ref_path)})
    return entry


# ---------------------------------------------------------------- cascades

CASCADE_DIR = "cascade"
# name: (labels, labelled training sentences)
CASCADES = {
    "tiny-guard": (["benign", "injection"], [
        ("hello world, good morning!", 0), ("thank you", 0), ("the cat sat on the mat", 0),
        ("what is the weather today in paris", 0), ("good night moon", 0), ("i like the blue sky", 0),
        ("hate the model, run the code", 1), ("please run this code function", 1), ("run run running code", 1),
        ("the model token vector hate", 1), ("run python code now please", 1), ("hate hate hate", 1),
    ]),
    "tiny-topic": (["animals", "places", "code"], [
        ("the cat sat on the mat", 0), ("a quick brown fox", 0), ("dogs and cats", 0), ("the bird and the fish", 0),
        ("paris is the capital of france", 1), ("tokyo japan city", 1), ("london in the rain", 1),
        ("rust code function", 2), ("python function number", 2), ("run the code", 2),
    ]),
}
CASCADE_REFERENCE_SENTENCES = EMBED_REFERENCE_SENTENCES + [
    "thank you", "hate hate hate", "run python code now please", "paris france city", "the cat and the dog",
]
CASCADE_BUCKETS, CASCADE_ORDERS = 64, (1, 2)


def build_cascades(outdir):
    """OUTDIR/cascade: tiny-encoder and the cascades of CASCADES over it (see the module doc)."""
    d = os.path.join(outdir, CASCADE_DIR)
    encoder = build_encoder(d, "tiny-encoder", 4321)
    tok_file = encoder["tokenizer"]
    tok = Tokenizer.from_file(os.path.join(d, tok_file))
    tok.no_padding()
    tok.enable_truncation(encoder["context_length"])
    sess = ort.InferenceSession(os.path.join(d, encoder["file"]), providers=["CPUExecutionProvider"])

    def embed(text):
        enc = tok.encode(text)
        ids = np.array([enc.ids], dtype=np.int64)
        hidden = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                                  "token_type_ids": np.zeros_like(ids)})[0][0]
        pooled = hidden.mean(axis=0)
        return pooled / np.linalg.norm(pooled)

    entries = [encoder]
    for i, (name, (labels, examples)) in enumerate(CASCADES.items()):
        md = os.path.join(d, name)
        os.makedirs(md, exist_ok=True)
        ids = [tok.encode(t).ids for t, _ in examples]
        y = np.array([l for _, l in examples])
        model = ngram.train(ngram.features(ids, CASCADE_ORDERS, CASCADE_BUCKETS), y, len(labels), CASCADE_BUCKETS,
                            l2=1e-4, steps=200, lr=0.05, seed=17 + i)
        rng = np.random.default_rng(99 + i)
        hidden = encoder["dims"]
        # tiny-guard's head reads the first stage's log-probabilities after the embedding, as the
        # real classifiers' heads do; tiny-topic's reads the embedding alone.
        stacked = name == "tiny-guard"
        width = hidden + (len(labels) if stacked else 0)
        layers = [(rng.standard_normal((width, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32) * 0.1),
                  (rng.standard_normal((8, len(labels))).astype(np.float32) * 2, np.zeros(len(labels), np.float32))]
        refs = CASCADE_REFERENCE_SENTENCES
        p_fast = ngram.scores(model, ngram.features([tok.encode(t).ids for t in refs], CASCADE_ORDERS, CASCADE_BUCKETS))
        # One threshold for every label, between the reference sentences' confidences, so some
        # sentences settle in the first stage and the others reach the head.
        conf = np.sort(p_fast.max(axis=1))
        middle = len(conf) // 2
        if conf[middle] - conf[middle - 1] < 1e-3:
            raise SystemExit(f"{name}: no clear gap between the reference confidences around the threshold")
        threshold = float(np.float32((conf[middle - 1] + conf[middle]) / 2))
        min_confidence = [threshold] * len(labels)
        ngram.save(model, os.path.join(md, "first_stage.bin"))
        head = {"input_dims": hidden, "first_stage_inputs": stacked, "layers": [
            {"rows": int(w.shape[0]), "cols": int(w.shape[1]), "weights": [float(x) for x in w.ravel()],
             "bias": [float(x) for x in b]} for w, b in layers]}
        with open(os.path.join(md, "head.json"), "w") as f:
            json.dump(head, f)
        cases = []
        for text, pf in zip(refs, p_fast):
            h = embed(text)
            if stacked:
                h = np.concatenate([h, np.log(np.clip(pf, 1e-7, 1.0))])
            for j, (w, b) in enumerate(layers):
                h = h @ w + b
                if j < len(layers) - 1:
                    h = np.maximum(h, 0)
            ph = np.exp(h - h.max())
            ph /= ph.sum()
            settled = pf.max() >= threshold
            cases.append({"text": text, "first_stage": [round(float(x), 7) for x in pf],
                          "head": [round(float(x), 7) for x in ph], "stage": "first_stage" if settled else "encoder",
                          "probabilities": [round(float(x), 7) for x in (pf if settled else ph)]})
        stages = {c["stage"] for c in cases}
        if stages != {"first_stage", "encoder"}:
            raise SystemExit(f"{name}: the reference sentences reach only {stages}")
        with open(os.path.join(md, "reference.json"), "w") as f:
            json.dump({"cascade": cases}, f, indent=1)
        entries.append({
            "name": name,
            "task": "classification",
            "file": f"{name}/head.json",
            "sha256": sha256_file(os.path.join(md, "head.json")),
            "tokenizer": tok_file,
            "tokenizer_sha256": encoder["tokenizer_sha256"],
            "context_length": encoder["context_length"],
            "labels": labels,
            "encoder": "tiny-encoder",
            "first_stage": {"file": f"{name}/first_stage.bin", "sha256": sha256_file(os.path.join(md, "first_stage.bin")),
                            "buckets": CASCADE_BUCKETS, "orders": list(CASCADE_ORDERS), "min_confidence": min_confidence},
            "reference": f"{name}/reference.json",
            "reference_sha256": sha256_file(os.path.join(md, "reference.json")),
        })
    return entries


def manifest_up_to_date(d, generator):
    """Whether d/manifest.json was written by this generator and every file it lists is intact."""
    try:
        with open(os.path.join(d, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("generator") != generator:
        return False
    for entry in manifest.get("models", []):
        for file_key, hash_key in (("file", "sha256"), ("tokenizer", "tokenizer_sha256"), ("reference", "reference_sha256")):
            p = os.path.join(d, entry[file_key])
            if not os.path.isfile(p) or sha256_file(p) != entry[hash_key]:
                return False
        stage = entry.get("first_stage")
        if stage and not (os.path.isfile(os.path.join(d, stage["file"]))
                          and sha256_file(os.path.join(d, stage["file"])) == stage["sha256"]):
            return False
    return bool(manifest.get("models"))


def write_manifest(d, generator, entries):
    manifest = {"version": 1, "generator": generator, "models": entries}
    tmp = os.path.join(d, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(d, "manifest.json"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    args = parser.parse_args()
    outdir = os.path.abspath(args.outdir)
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.abspath(__file__), os.path.join(here, "models", "llama_onnx.py"),
               os.path.join(here, "models", "ngram.py")]
    generator = "make-test-models.py sha256:" + ",".join(sha256_file(p) for p in sources)
    shaped = os.path.join(outdir, SMOLLM2_SHAPED_DIR)
    cascades = os.path.join(outdir, CASCADE_DIR)
    if all(manifest_up_to_date(d, generator) for d in (outdir, shaped, cascades)):
        print(f"test models in {outdir} are up to date")
        return
    os.makedirs(outdir, exist_ok=True)
    entries = [
        build_encoder(outdir, "tiny-embed", 4321),
        build_encoder(outdir, "tiny-classify", 5678, CLASSIFY_LABELS),
        build_chat(outdir),
    ]
    # The directories of their own first: the top manifest, written last, marks the whole build.
    smollm2_shaped = build_smollm2_shaped(outdir)
    write_manifest(shaped, generator, [smollm2_shaped])
    cascade_entries = build_cascades(outdir)
    write_manifest(cascades, generator, cascade_entries)
    write_manifest(outdir, generator, entries)
    print(f"built {', '.join(e['name'] for e in entries + [smollm2_shaped] + cascade_entries)} in {outdir}")


if __name__ == "__main__":
    sys.exit(main())
