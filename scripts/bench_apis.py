#!/usr/bin/env python3
"""Added latency of meshgate's ingress APIs side by side, in one run: the same short conversation
sent as OpenAI Chat Completions, as an OpenAI Responses request and as an Anthropic Messages
request to one meshgate, and as Chat Completions to the mock upstream itself (the baseline), each
at a fixed rate (oha, open loop with latency correction), several rounds interleaved so drift
hits every API alike. Prints the median over rounds of p50 and p99 and what meshgate adds to the
mock's; writes every oha JSON under --out.

Usage: bench_apis.py --edge URL --mock URL --key KEY --oha PATH --out DIR [--rate 200]
                     [--duration 15] [--rounds 3] [--connections 32]
"""

import argparse
import json
import os
import statistics
import subprocess

PROMPT = "Say hello to the benchmark in one short sentence, please."


def targets(edge, mock, key, model):
    bearer = [f"Authorization: Bearer {key}"]
    return [
        ("mock (chat)", f"{mock}/v1/chat/completions", [],
         {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64}),
        ("chat completions", f"{edge}/v1/chat/completions", bearer,
         {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64}),
        ("responses", f"{edge}/v1/responses", bearer,
         {"model": model, "input": PROMPT, "max_output_tokens": 64}),
        ("messages", f"{edge}/v1/messages", [f"x-api-key: {key}", "anthropic-version: 2023-06-01"],
         {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64}),
    ]


def run_oha(args, name, url, headers, body, round_no):
    slug = name.split(" ")[0]
    body_path = os.path.join(args.out, f"{slug}.json.body")
    with open(body_path, "w") as f:
        json.dump(body, f)
    out = os.path.join(args.out, f"{slug}-{round_no}.json")
    cmd = [args.oha, "--no-tui", "--output-format", "json", "-z", f"{args.duration}s", "-c", str(args.connections),
           "-q", str(args.rate), "--latency-correction", "-m", "POST", "-H", "Content-Type: application/json",
           "-D", body_path]
    for header in headers:
        cmd += ["-H", header]
    cmd.append(url)
    with open(out, "w") as f:
        subprocess.run(cmd, stdout=f, check=True, timeout=args.duration + 60)
    with open(out) as f:
        result = json.load(f)
    statuses = result.get("statusCodeDistribution", {})
    ok = statuses.get("200", 0)
    total = sum(statuses.values())
    if total == 0 or ok != total:
        raise SystemExit(f"{name}: {total - ok} of {total} requests were not 200: {statuses}")
    percentiles = result["latencyPercentiles"]
    return percentiles["p50"] * 1000, percentiles["p99"] * 1000, result["summary"]["requestsPerSec"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edge", required=True)
    parser.add_argument("--mock", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--oha", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="mock-gpt")
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    measured = {}
    for round_no in range(1, args.rounds + 1):
        for name, url, headers, body in targets(args.edge, args.mock, args.key, args.model):
            p50, p99, rps = run_oha(args, name, url, headers, body, round_no)
            measured.setdefault(name, []).append((p50, p99, rps))
            print(f"# round {round_no} {name}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, {rps:.0f} req/s", flush=True)
    base = measured["mock (chat)"]
    print(f"\n{args.rate} req/s for {args.duration} s, {args.rounds} rounds; medians (ms); added = minus the mock "
          "in the same round")
    print("| API | p50 | p99 | added p50 | added p99 | req/s | added p50 per round |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, rows in measured.items():
        added = [(p50 - b50, p99 - b99) for (p50, p99, _), (b50, b99, _) in zip(rows, base)]
        med = lambda values: statistics.median(values)  # noqa: E731
        print(f"| {name} | {med([r[0] for r in rows]):.3f} | {med([r[1] for r in rows]):.3f} | "
              f"{med([a[0] for a in added]):.3f} | {med([a[1] for a in added]):.3f} | "
              f"{med([r[2] for r in rows]):.0f} | {', '.join(f'{a[0]:.3f}' for a in added)} |")


if __name__ == "__main__":
    main()
