"""One `roll iterate` iteration against one TRL GRPOTrainer step, measured side by side in one run.

Both sides: the embedded default model (GPT-2 d=192 × 4, 1.8 M parameters, fp32), the arith train prompts
in roll's version order, 64 prompts × G = 8 completions of at most 48 new tokens at T = 1, one AdamW step
(lr 3e-4, no weight decay, grad clip 1) on those 512 completions in micro-batches of the same size, torch
limited to the same threads. TRL: GRPOTrainer (no vLLM, bf16 off, β = 0 so no reference model, constant
lr, gradient checkpointing off — its faster setting — unless --trl-gradient-checkpointing, TRL's default).
roll: `pipeline.iterate.run`, i.e. generate → verify → score → train with Parquet hand-offs between the
stages, evaluation off, the stable-pess objective.

Each engine runs in its own fresh subprocess for `--steps` updates; the first update pays one-off costs
(imports, first allocations) and is dropped. Engines alternate, `--pairs` times. Per pair: the median
per-update time of each and their ratio (roll / TRL); roll's time is also split by stage.

    python bench/iteration_vs_trl.py [--pairs 3] [--steps 6] [--micro-batch 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, GROUP, MAX_NEW_TOKENS, LR = 64, 8, 48, 3e-4
STAGES = ("generate", "verify", "score", "train")


def roll_child(steps: int, micro_batch: int, work: Path) -> dict:
    from roll.pipeline.iterate import IterateConfig, run
    from roll.runs import InitConfig, init_run
    from roll.stages.generate import GenerateConfig
    from roll.stages.train import TrainConfig

    root = work / "run"
    init_run(InitConfig(run=root))
    summary = run(IterateConfig(
        run=root, iterations=steps, eval_every=0,
        generate=GenerateConfig(run=root, prompts=PROMPTS, group_size=GROUP, max_new_tokens=MAX_NEW_TOKENS),
        train=TrainConfig(run=root, objective="stable-pess", lr=LR, mini_batch=PROMPTS * GROUP, micro_batch=micro_batch)))
    per_step = [sum(s[name] for name in STAGES) for s in summary["stage_seconds"]]
    from roll.store import Run, query

    tokens = query(Run(root), "select avg(num_tokens) from rollouts").fetchone()[0]
    return {"per_step": per_step, "stages": summary["stage_seconds"], "mean_completion_tokens": tokens}


def trl_child(steps: int, micro_batch: int, work: Path, gradient_checkpointing: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from roll.policy import quiet_transformers
    from roll.runs import default_model_dir
    from roll.stages.generate import version_prompt_ids
    from roll.tasks import build_prompts
    from roll.verifiers import verify_arith

    quiet_transformers()
    prompts = build_prompts("arith", 0).to_pylist()
    by_id = {p["prompt_id"]: p for p in prompts}
    train_ids = [p["prompt_id"] for p in prompts if p["split"] == "train"]
    order = [pid for v in range(steps) for pid in version_prompt_ids(train_ids, v, PROMPTS, 0)]
    dataset = Dataset.from_list([{"prompt": by_id[pid]["prompt"], "answer": by_id[pid]["answer"]} for pid in order])

    def reward(completions, answer, **_):
        return [float(verify_arith(c, a).correct) for c, a in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.started, self.per_step, self.lengths = None, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.per_step.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir()))
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    timer = StepTimer()
    config = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, seed=0,
        per_device_train_batch_size=micro_batch, gradient_accumulation_steps=PROMPTS * GROUP // micro_batch,
        num_generations=GROUP, max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        beta=0.0, gradient_checkpointing=gradient_checkpointing, max_steps=steps, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"per_step": timer.per_step, "mean_completion_tokens": statistics.fmean(timer.lengths) if timer.lengths else None}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        if args.child == "roll":
            result = roll_child(args.steps, args.micro_batch, Path(work))
        else:
            result = trl_child(args.steps, args.micro_batch, Path(work), args.trl_gradient_checkpointing)
    print("RESULT " + json.dumps(result))


def spawn(engine: str, args) -> dict:
    command = [sys.executable, __file__, "--child", engine, "--steps", str(args.steps), "--micro-batch",
               str(args.micro_batch), "--threads", str(args.threads)]
    if args.trl_gradient_checkpointing:
        command.append("--trl-gradient-checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{engine} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="updates per engine per pair (the first is dropped)")
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-gradient-checkpointing", action="store_true")
    parser.add_argument("--child", choices=["roll", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    if args.child:
        return child(args)

    pairs = []
    for index in range(args.pairs):
        pair = {}
        for engine in (("roll", "trl") if index % 2 == 0 else ("trl", "roll")):  # alternate who goes first
            pair[engine] = spawn(engine, args)
            steady = pair[engine]["per_step"][1:]
            print(f"pair {index + 1} {engine}: median {statistics.median(steady):.2f} s/update "
                  f"({', '.join(f'{s:.2f}' for s in steady)})", file=sys.stderr, flush=True)
        pairs.append(pair)

    def med(engine, pair):
        return statistics.median(pair[engine]["per_step"][1:])

    print(f"\n{args.pairs} alternating pairs, {args.steps} updates each (first dropped), micro-batch "
          f"{args.micro_batch}, {args.threads} threads, TRL gradient checkpointing "
          f"{'on' if args.trl_gradient_checkpointing else 'off'}\n")
    print("| pair | roll s/iteration (median, min–max) | TRL s/step (median, min–max) | ratio roll/TRL |")
    print("|---:|---:|---:|---:|")
    ratios = []
    for index, pair in enumerate(pairs):
        r, t = pair["roll"]["per_step"][1:], pair["trl"]["per_step"][1:]
        ratios.append(med("roll", pair) / med("trl", pair))
        print(f"| {index + 1} | {statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f}) | "
              f"{statistics.median(t):.2f} ({min(t):.2f}–{max(t):.2f}) | {ratios[-1]:.2f} |")
    all_roll = [s for p in pairs for s in p["roll"]["per_step"][1:]]
    all_trl = [s for p in pairs for s in p["trl"]["per_step"][1:]]
    print(f"| all | {statistics.median(all_roll):.2f} ({min(all_roll):.2f}–{max(all_roll):.2f}) | "
          f"{statistics.median(all_trl):.2f} ({min(all_trl):.2f}–{max(all_trl):.2f}) | "
          f"**{statistics.median(ratios):.2f}** (median of pairs) |")
    print("\nroll's iteration by stage (median over all measured iterations, s):\n")
    print("| " + " | ".join(STAGES) + " |")
    print("|" + "---:|" * len(STAGES))
    stage_rows = [s for p in pairs for s in p["roll"]["stages"][1:]]
    print("| " + " | ".join(f"{statistics.median(s[name] for s in stage_rows):.2f}" for name in STAGES) + " |")
    lengths = {e: statistics.fmean(p[e]["mean_completion_tokens"] for p in pairs) for e in ("roll", "trl")
               if all(p[e]["mean_completion_tokens"] is not None for p in pairs)}
    print("\nmean completion length (tokens): " + ", ".join(f"{e} {v:.1f}" for e, v in lengths.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "pairs": pairs}, indent=1))


if __name__ == "__main__":
    main()
