"""Orchestration above the API: the evaluation run and the time-grid searches (GITS, LD3)."""
