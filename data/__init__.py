"""Bundled data: the embedded default model (default_model/, for arith), the chain task's model (chain_model/)
and real datasets (installed as roll.data)."""
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = DATA_DIR / "default_model"
CHAIN_MODEL_DIR = DATA_DIR / "chain_model"
