"""Iteration loop, lag scheduling, Slurm rendering and reports (installed as roll.pipeline)."""
