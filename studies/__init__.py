"""Studies: commands that run grids of experiments and regenerate tables and plots from small
per-run result files (``python -m studies.lm`` for the LM study)."""
