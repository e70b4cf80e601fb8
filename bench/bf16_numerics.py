"""What bf16 does to roll's numbers, against float32, on the same small Qwen2 checkpoint (issue 13).

The test suite's Qwen2 builder (GQA, tied embeddings, BPE tokenizer trained on bundled GSM8K text) saved in
bfloat16; two runs from it, `roll init --dtype float32` and `--dtype bfloat16`, each: 16 GSM8K prompts × 4
completions of ≤ 64 tokens, verified and scored, rewards alternated so every group has a gradient, then one
pmd-mean update at lr 1e-5 in one optimiser step. Reported per run:

  scorer_vs_sampler_max_abs   worst |teacher-forced − sampled| log-prob of any token (scores.mismatch_max_abs)
  train_step0_log_ratio_mean  the trainer's mean sequence Δ against π_b at the first step (θ = θ_b)
  ratio_min, ratio_max        its token ratios then
  stored_weights_changed      share of the stored weights whose value changed with that one step

    python bench/bf16_numerics.py [--work /tmp/roll-bf16]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import torch
    from conftest import build_chat_checkpoint, fixed_data_run, roll_cli
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from roll.store import Run, query

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/roll-bf16"))
    work = parser.parse_args().work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = build_chat_checkpoint(work / "fp32", "qwen2")
    AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16).save_pretrained(work / "bf16")
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(work / "bf16")
    out = {}
    for dtype in ("float32", "bfloat16"):
        run = work / f"run-{dtype}"
        roll_cli("init", "--run", run, "--model", work / "bf16", "--task", "gsm8k", "--dtype", dtype)
        fixed_data_run(run, prompts=16, group_size=4, max_new_tokens=64)
        roll_cli("train", "--run", run, "--objective", "pmd-mean", "--mini-batch", "1000", "--lr", "1e-5")
        r = Run(run)
        mismatch = query(r, "select max(mismatch_max_abs) from scores").fetchall()[0][0]
        delta, low, high = query(r, "select log_ratio_mean, ratio_min, ratio_max from steps").fetchall()[0]
        v0, v1 = (load_file(r.policy_dir(v) / "model.safetensors") for v in (0, 1))
        changed = sum(int((v0[k] != v1[k]).sum()) for k in v0) / sum(v0[k].numel() for k in v0)
        out[dtype] = {"scorer_vs_sampler_max_abs": mismatch, "train_step0_log_ratio_mean": delta,
                      "ratio_min": low, "ratio_max": high, "stored_weights_changed": changed}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
