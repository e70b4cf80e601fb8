"""`python -m roll …` (and `torchrun -m roll …`) runs the CLI."""
from roll.cli import main

main()
