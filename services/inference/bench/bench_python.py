#!/usr/bin/env python3
"""Python onnxruntime baseline for services/inference/bench/run.sh: the same model files, the same
intra-op threads, the same inputs as the Rust service. Prints one JSON object per measurement.

Sessions use THREADS intra-op threads and, like the service by default, no spinning
(INTRA_OP_SPINNING=1 turns it on for both sides of run.sh).

  bench_python.py embed    MODEL_DIR SENTENCES_FILE THREADS DURATION_S CONCURRENCY
      batch-1 loop: tokenize one sentence, run, mean-pool, normalise; CONCURRENCY Python threads
      each running that loop on one shared session (onnxruntime releases the GIL while it runs).
  bench_python.py generate MODEL_DIR PROMPTS_FILE THREADS RUNS MAX_TOKENS
      greedy decoding with the KV cache (scripts/models/llama_onnx.py GreedyRunner's loop), the
      prompt rendered with SmolLM2's template, each token decoded to text as it is produced.
"""

import json
import os
import resource
import sys
import threading
import time

import numpy as np
from tokenizers import Tokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, os.path.join(ROOT, "scripts", "models"))
import encoder  # noqa: E402
import llama_onnx  # noqa: E402

SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def cpu_seconds():
    """CPU time of this process (all threads): the work per request, whatever share of a busy
    machine the process gets."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def session(path, threads):
    """The session options the service uses: THREADS intra-op threads, spinning off unless
    INTRA_OP_SPINNING=1 (the service's `intra_op_spinning`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("INTRA_OP_SPINNING", "0"))
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def embed(model_dir, sentences_file, threads, duration, concurrency):
    sess = session(os.path.join(model_dir, "model.onnx"), threads)
    tok = encoder.tokenizer(os.path.join(model_dir, "tokenizer.json"))
    sentences = lines(sentences_file)

    def one(text):
        inputs = encoder.feed([tok.encode(text)])
        return encoder.pool(sess.run(["last_hidden_state"], inputs)[0], inputs["attention_mask"])[0]

    for s in sentences[:20]:
        one(s)
    latencies = [[] for _ in range(concurrency)]
    cpu_before = cpu_seconds()
    started = time.perf_counter()

    def worker(w):
        i = w * 7919
        while time.perf_counter() - started < duration:
            t = time.perf_counter()
            one(sentences[i % len(sentences)])
            i += 1
            latencies[w].append((time.perf_counter() - t) * 1e3)

    workers = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    all_ms = np.sort(np.concatenate([np.array(l) for l in latencies]))
    print(json.dumps({
        "impl": "python-ort", "what": "embed", "model": os.path.basename(model_dir.rstrip("/")), "threads": threads,
        "concurrency": concurrency, "requests": len(all_ms), "rps": len(all_ms) / elapsed,
        "p50_ms": float(np.percentile(all_ms, 50)), "p99_ms": float(np.percentile(all_ms, 99)),
        "cpu_ms_per_request": cpu * 1e3 / len(all_ms),
    }), flush=True)


def generate(model_dir, prompts_file, threads, runs, max_tokens):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    import onnx

    m = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=False)
    past = [i for i in m.graph.input if i.name.startswith("past_key_values.")]
    dims = past[0].type.tensor_type.shape.dim
    layers, kv_heads, head_dim = len(past) // 2, dims[1].dim_value, dims[3].dim_value
    del m
    path = os.path.join(model_dir, "model.onnx")
    runner = llama_onnx.GreedyRunner(path, layers, kv_heads, head_dim, session=session(path, threads))
    eos = {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    ttfts, rates, total_tokens = [], [], 0
    for run in range(runs + 1):
        for prompt in lines(prompts_file):
            started = time.perf_counter()
            ids = tok.encode(llama_onnx.render_chatml([{"role": "user", "content": prompt}], SYSTEM_PROMPT)).ids
            logits, past_kv = runner.forward(ids, runner.empty_past(), 0)
            out, first, text = [], None, ""
            while True:
                token = int(np.argmax(logits[-1]))
                if token in eos:
                    break
                out.append(token)
                text = tok.decode(out)
                if first is None:
                    first = time.perf_counter() - started
                if len(out) == max_tokens:
                    break
                logits, past_kv = runner.forward([token], past_kv, len(ids) + len(out) - 1)
            total = time.perf_counter() - started
            # Produced tokens count the end token, as the service's usage does.
            produced = len(out) + (1 if len(out) < max_tokens else 0)
            if run > 0 and first is not None:
                ttfts.append(first * 1e3)
                rates.append((produced - 1) / (total - first))
                total_tokens += produced
    print(json.dumps({
        "impl": "python-ort", "what": "generate", "model": os.path.basename(model_dir.rstrip("/")), "threads": threads,
        "generations": len(ttfts), "tokens": total_tokens,
        "ttft_p50_ms": float(np.median(ttfts)), "tokens_per_s_p50": float(np.median(rates)),
    }), flush=True)


def main():
    what = sys.argv[1]
    if what == "embed":
        embed(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
    elif what == "generate":
        generate(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
