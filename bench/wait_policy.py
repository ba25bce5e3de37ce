"""How OpenMP's wait setting changes decoding on the real model, on a quiet machine and beside one busy process.

Decoding is hundreds of small parallel regions a token; between them a waiting thread either sleeps
(``OMP_WAIT_POLICY=PASSIVE``, what ``threads=auto`` sets), spins a bounded while first (``GOMP_SPINCOUNT=<n>``,
what an explicit ``threads=N`` of 2 or more sets: ``marl_exp.run.threads.SHORT_SPIN``) or spins long (OpenMP's
default, what a script gets that sets nothing). Each setting runs in a fresh process (libgomp reads it when
torch loads): SmolLM2-135M-Instruct (``model=smollm2``), fp32, 2 threads, samples 16 replies (4 requests x 4) of
exactly 40 tokens, as one GRPO step of ``experiment=smollm2_sentiment`` does; one warm-up, then ``--rounds``
timed (median). Then the same beside one busy process (a pure-Python loop on one core).

    python bench/wait_policy.py --out bench/results/wait_policy.json   # ~5 min on 2 quiet cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SPIN_COUNTS = ("1000", "3000", "10000", "30000")
THREADS = 2
REQUESTS, REPLIES, TOKENS = 4, 4, 40


def settings() -> dict[str, dict[str, str]]:
    from marl_exp.run.threads import SHORT_SPIN

    spins = {f"GOMP_SPINCOUNT={n}" + (" (threads=N)" if n == SHORT_SPIN else ""): {"GOMP_SPINCOUNT": n}
             for n in SPIN_COUNTS}
    return {"PASSIVE (threads=auto)": {"OMP_WAIT_POLICY": "PASSIVE"}, **spins, "OpenMP default": {}}


# ------------------------------------------------------------------------------------- child process
def child(model_dir: str, rounds: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from marl_exp.data import chat, sentiment

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = chat.encode_prompts(tokenizer, sentiment.requests("train", seed=0)[:REQUESTS])
    ids, mask = (enc[key].repeat_interleave(REPLIES, 0) for key in ("input_ids", "attention_mask"))
    times = []
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # the first is a warm-up
            torch.manual_seed(round_)
            started = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                           max_new_tokens=TOKENS, min_new_tokens=TOKENS, pad_token_id=tokenizer.pad_token_id)
            times.append(time.perf_counter() - started)
    print(json.dumps({"threads": torch.get_num_threads(), "times_s": times[1:], "median_s": common.median(times[1:])}))


def measure(model_dir: str, rounds: int, wait: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), **wait})
    proc = subprocess.run([sys.executable, __file__, "--child", model_dir, "--rounds", str(rounds)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(rounds: int) -> dict:
    from marl_exp.modeling.gguf_import import smollm2_dir

    model_dir = str(smollm2_dir())
    results = {"machine": common.machine(), "threads": THREADS, "rounds": rounds,
               "work": f"{REQUESTS} requests x {REPLIES} replies x {TOKENS} tokens", "runs": {}}
    for name, wait in settings().items():
        results["runs"][name] = {"env": wait, "quiet": measure(model_dir, rounds, wait)}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        for name, wait in settings().items():
            results["runs"][name]["busy"] = measure(model_dir, rounds, wait)
    finally:
        spinner.kill()
        spinner.wait()
    return with_ratios(results)


def with_ratios(results: dict) -> dict:
    """Each setting's median over PASSIVE's, quiet and busy: the ratios the docs quote, in the results file."""
    passive = results["runs"]["PASSIVE (threads=auto)"]
    for run_ in results["runs"].values():
        run_["quiet_over_passive"] = run_["quiet"]["median_s"] / passive["quiet"]["median_s"]
        run_["busy_over_passive"] = run_["busy"]["median_s"] / passive["busy"]["median_s"]
    return results


def report(results: dict) -> str:
    lines = [f"Decoding {results['work']}, SmolLM2-135M-Instruct, fp32, {results['threads']} threads, median of "
             f"{results['rounds']}; {common.machine_line(results['machine'])} ({results['machine']['tree']} tree)", "",
             "| wait setting | quiet s | ÷ PASSIVE | beside a busy process s | ÷ PASSIVE |", "|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        lines.append(f"| {name} | {r['quiet']['median_s']:.2f} | {r['quiet_over_passive']:.2f} | "
                     f"{r['busy']['median_s']:.2f} | {r['busy_over_passive']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the raw numbers as JSON here")
    parser.add_argument("--child", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    common.add_allow_dirty(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rounds)
        return
    common.refuse_dirty_publish(args.out, args.allow_dirty)
    results = run(args.rounds)
    print(report(results))
    if args.out:
        common.write_json(args.out, results)


if __name__ == "__main__":
    main()
