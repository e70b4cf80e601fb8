"""What bf16 does to roll's numbers, against float32, on the same small Qwen2 checkpoint (issue 13).

The test suite's Qwen2 builder (GQA, tied embeddings, BPE tokenizer trained on bundled GSM8K text) saved in
bfloat16; two runs from it, `roll init --dtype float32` and `--dtype bfloat16`, each: 16 GSM8K prompts × 4
completions of ≤ 64 tokens, verified and scored, rewards alternated so every group has a gradient, then one
pmd-mean update at lr 1e-5 in one optimiser step. Reported per run:

  scorer_vs_sampler_max_abs   worst |teacher-forced − sampled| log-prob of any token (scores.mismatch_max_abs)
  train_step0_log_ratio_mean  the trainer's mean sequence Δ against π_b at the first step (θ = θ_b)
  ratio_min, ratio_max        its token ratios then
  stored_weights_changed      share of the stored weights whose value changed with that one step

And LoRA on the bf16 run (DESIGN §3.1c): one rank-8 update at lr 1e-5, 1e-4 and 1e-3 from the same data; the
change of every completion token's log-prob from v0 to v1 as the stages see it (the adapter merged into the
bf16 weights) and as it would be unmerged (bf16 base, float32 adapter), each against the change computed in
float32 (correlation, mean |change|): does merging into bf16 erase a small update?

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
        if dtype == "bfloat16":
            out["lora"] = {lr: lora_fidelity(run, work / f"lora-{lr}", lr) for lr in ("1e-5", "1e-4", "1e-3")}
    print(json.dumps(out, indent=1))


def lora_fidelity(trained_run: Path, run: Path, lr: str) -> dict:
    """One LoRA update v0 → v1 on a copy of `trained_run`'s version-0 data; the log-prob changes it makes."""
    import torch
    from conftest import roll_cli
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from roll.lora import merged, quiet_peft
    from roll.sampling import completion_logprobs
    from roll.store import Run, query

    shutil.copytree(trained_run, run)
    shutil.rmtree(Run(run).policy_dir(1))
    roll_cli("train", "--run", run, "--objective", "pmd-mean", "--mini-batch", "1000", "--lr", lr, "--lora-rank", "8",
             "--force")
    r = Run(run)
    rows = query(r, "select prompt_token_ids, token_ids from samples where policy_version = 0").fetchall()
    prompts, completions = [list(p) for p, _ in rows], [list(c) for _, c in rows]

    def base(dtype):
        return AutoModelForCausalLM.from_pretrained(str(r.policy_dir(0)), dtype=dtype)

    def logprobs(model):
        with torch.no_grad():
            return completion_logprobs(model, prompts, completions, 1.0)

    with quiet_peft():
        unmerged = {dtype: PeftModel.from_pretrained(base(dtype), str(r.policy_dir(1))).get_base_model()
                    for dtype in (torch.bfloat16, torch.float32)}
    v0_bf16, mask = logprobs(base(torch.bfloat16))
    truth = (logprobs(unmerged[torch.float32])[0] - logprobs(base(torch.float32))[0])[mask]
    result = {"float32_mean_abs_change": float(truth.abs().mean())}
    for name, model in (("merged_bf16", merged(base(torch.bfloat16), r.policy_dir(1))),
                        ("unmerged_bf16", unmerged[torch.bfloat16])):
        change = (logprobs(model)[0] - v0_bf16)[mask]
        result[name] = {"mean_abs_change": float(change.abs().mean()),
                        "correlation_with_float32": float(torch.corrcoef(torch.stack([change, truth]))[0, 1])}
    return result


if __name__ == "__main__":
    main()
