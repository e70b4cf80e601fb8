"""The pipeline stages, one module each: generate, verify, score, train, evaluate (installed as roll.stages)."""
