"""The sampling core: base solvers, methods (base and IIA), time grids and grid files, the step loop."""
