"""Experiments run with roll, not part of its pipeline: the staleness grids (`grid`), their tables and plots
(`experiment`, `frontier`) and the off-policy-evaluation study (`ope_study`). Nothing in roll imports them."""
