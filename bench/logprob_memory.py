"""Peak memory of score's teacher-forced log-probs at a real vocabulary: the whole head vs the chunked head.

    python bench/logprob_memory.py [--vocab 151936] [--batch 8] [--tokens 256] [--repeats 3]

A Qwen2-architecture model with Qwen's 151,936-token vocabulary (random weights; hidden 256, 2 layers, so
the head dominates as it does in a real model's scoring), 8 sequences of 32 prompt + 256 completion tokens,
no gradient (as `roll score`). Each arm runs in its own fresh process: peak RSS after loading the model
and building the batch, and peak RSS after computing the log-probs (`resource.getrusage`); the difference
is the computation's peak. Both arms' log-probs are compared (max |difference|) in the same run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ARM = r"""
import json, resource, sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from roll.sampling import completion_logprobs
vocab, batch, tokens, chunked, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(0, vocab, (32,), generator=g).tolist() for _ in range(batch)]
completions = [torch.randint(0, vocab, (tokens,), generator=g).tolist() for _ in range(batch)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    logprobs, mask = completion_logprobs(model, prompts, completions, 1.0, 1.0, chunked=chunked)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.save(logprobs, out)
print(json.dumps({"peak_mib": (after - before) / 1024, "rss_before_mib": before / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import statistics

    import torch

    results = {"whole head": [], "chunked head": []}
    gaps = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            saved = {}
            for name, flag in (("whole head", "0"), ("chunked head", "1")):
                path = Path(tmp) / f"{flag}.pt"
                proc = subprocess.run([sys.executable, "-c", ARM, str(args.vocab), str(args.batch), str(args.tokens),
                                       flag, str(path)], capture_output=True, text=True, check=True)
                results[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])
                saved[name] = torch.load(path)
            gaps.append((saved["whole head"] - saved["chunked head"]).abs().max().item())
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(json.dumps({"vocab": args.vocab, "batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
                      "peak_mib": results, "median_peak_mib": medians,
                      "ratio": medians["chunked head"] / medians["whole head"], "max_logprob_gap": max(gaps)}, indent=2))


if __name__ == "__main__":
    main()
