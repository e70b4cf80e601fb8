"""`python -m roll …` (and `torchrun -m roll …`) runs the CLI."""
from roll.cli import main

# guarded: vLLM's engine starts its workers with multiprocessing's spawn, which re-imports this module
if __name__ == "__main__":
    main()
