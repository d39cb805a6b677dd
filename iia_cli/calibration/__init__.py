"""IIA's calibration: the teacher, the least squares fit, the guard, coefficient files and checkpoints."""
