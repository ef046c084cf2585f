"""Runs: a run's folder and record, the store of runs, background jobs, export."""
