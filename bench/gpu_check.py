"""GPU check: `roll generate` (hf backend) and one `roll train` update on CUDA, with tokens/s, plus FSDP.

Runs the plain CLI as subprocesses, as a user would, for two models: the embedded default (GPT-2 d=192,
4 layers, 1.8 M parameters) and a randomly initialised GPT-2 of d=768, 12 layers (86 M parameters) with
the same tokenizer, so the numbers are not only kernel-launch overhead. Then trains the default model's
update again under `torchrun --nproc-per-node 1 -m roll train --fsdp` (NCCL, FSDP2) and compares its v1
weights with the plain update's; last, three `roll iterate` iterations of the 86 M model.

    python bench/gpu_check.py --out DIR      # needs a CUDA GPU; writes DIR/gpu_check.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def roll(*args: str, env: dict | None = None) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "roll", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"roll {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout.strip()
    summary = json.loads(out[out.index("{"):]) if "{" in out else {}
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    return summary


def train_tokens_per_s(run: Path, version: int) -> dict:
    from roll.store import Run, query

    tokens, seconds = query(Run(run), f"select sum(tokens), sum(seconds) from steps where policy_version = {version}").fetchone()
    return {"train_tokens": int(tokens), "train_step_seconds": round(seconds, 3), "train_tokens_per_s": round(tokens / seconds, 1)}


def big_model(directory: Path) -> Path:
    from roll.policy import build_default_model, build_default_tokenizer

    tokenizer = build_default_tokenizer()
    model = build_default_model(tokenizer, d_model=768, layers=12, heads=12)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--work", default="/tmp/roll-gpu-check")
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    parser.add_argument("--small-only", action="store_true", help="skip the 86 M model (a CPU dry run)")
    args = parser.parse_args()

    import torch
    import transformers

    out, work = Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = {"torch": torch.__version__, "transformers": transformers.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "models": {}}
    models = {"default (1.8M)": None}
    if not args.small_only:
        models["gpt2 d768x12 random (86M)"] = big_model(work / "big-model")
    for name, model in models.items():
        run = work / name.split()[0]
        roll("init", "--run", str(run), *(["--model", str(model)] if model else []))
        gen = roll("generate", "--run", str(run), "--device", args.device)
        trn = roll("train", "--run", str(run), "--device", args.device)
        report["models"][name] = {"generate": gen, "train": trn, **train_tokens_per_s(run, 1)}
        print(json.dumps({name: report["models"][name]}, indent=1), flush=True)

    # FSDP (NCCL, one rank) on the default model's data: the same v1 as the plain update
    from safetensors.torch import load_file

    from roll.store import Run

    run = work / "default"
    plain = load_file(Run(run).policy_dir(1) / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "-m", "roll", "train", "--version", "0", "--force", "--device", args.device, "--fsdp"],
                          capture_output=True, text=True, env={**os.environ, "ROLL_RUN": str(run)})
    fsdp = load_file(Run(run).policy_dir(1) / "model.safetensors") if proc.returncode == 0 else None
    report["fsdp"] = {"returncode": proc.returncode, "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
                      "max_abs_diff_vs_plain": max((fsdp[k] - plain[k]).abs().max().item() for k in plain) if fsdp else None,
                      **(train_tokens_per_s(run, 1) if fsdp else {})}
    print(json.dumps({"fsdp": report["fsdp"]}, indent=1), flush=True)

    # the in-process loop on the GPU: 3 iterations of the 86 M model (models kept loaded between stages)
    if not args.small_only:
        run = work / "iterate"
        roll("init", "--run", str(run), "--model", str(models["gpt2 d768x12 random (86M)"]))
        summary = roll("iterate", "--run", str(run), "--iterations", "3", "--eval-every", "0", "--device", args.device)
        report["iterate"] = {"stage_seconds": summary["stage_seconds"], "wall_s": summary["wall_s"]}
        print(json.dumps({"iterate": report["iterate"]}, indent=1), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
