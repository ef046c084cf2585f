"""Runs: the store of runs, background training jobs, export (the run folder itself is written by training)."""
