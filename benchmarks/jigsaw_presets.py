"""Base-model accuracy and reward of each text jigsaw preset, greedy and sampled (the numbers behind the
default preset; see dynamics/tasks/jigsaw.py).

    .venv/bin/python benchmarks/jigsaw_presets.py --n 48 --samples 8 --temperature 1.0 text text-2x2 ...

For each preset: greedy accuracy / hit / format / total reward, and over ``samples`` rollouts per prompt at
``temperature``: the fraction fully correct, the fraction of prompts with at least one correct rollout (GRPO
needs those), format rate and mean total reward. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

from dynamics.generation import generate
from dynamics.models import load_model
from dynamics.tasks import get_task
from dynamics.tasks.jigsaw import PRESETS


def measure(lm, preset: str, n: int, samples: int, temperature: float, seed: int) -> dict:
    task = get_task("jigsaw", preset=preset)
    records = task.build(n, seed)
    t0 = time.time()
    greedy = generate(lm, records, max_new_tokens=task.max_new_tokens, batch_size=32, progress=False)
    sampled = generate(lm, records, max_new_tokens=task.max_new_tokens, temperature=temperature,
                       num_samples=samples, batch_size=64, seed=seed, progress=False)
    g = [task.score(o[0], r["answer"]) for o, r in zip(greedy, records, strict=True)]
    s = [[task.score(x, r["answer"]) for x in o] for o, r in zip(sampled, records, strict=True)]
    flat = [x for row in s for x in row]
    mean = lambda rows, k: sum(x[k] for x in rows) / len(rows)  # noqa: E731
    return {"preset": preset, "greedy_acc": mean(g, "accuracy"), "greedy_hit": mean(g, "hit"),
            "greedy_format": mean(g, "format"), "greedy_reward": mean(g, "total"),
            "sampled_acc": mean(flat, "accuracy"), "prompts_with_correct": sum(any(x["accuracy"] for x in row)
                                                                              for row in s) / len(s),
            "sampled_format": mean(flat, "format"), "sampled_reward": mean(flat, "total"),
            "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="*", default=[p for p in PRESETS if PRESETS[p]["form"] == "text"])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    lm = load_model(args.model)
    cols = ["preset", "greedy_acc", "greedy_hit", "greedy_format", "greedy_reward", "sampled_acc",
            "prompts_with_correct", "sampled_format", "sampled_reward", "seconds"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    for preset in args.presets:
        row = measure(lm, preset, args.n, args.samples, args.temperature, args.seed)
        print("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |",
              flush=True)


if __name__ == "__main__":
    main()
