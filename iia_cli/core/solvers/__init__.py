"""Base ODE solvers, one file per family, and their registry (registry.py)."""
