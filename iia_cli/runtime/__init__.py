"""The bottom layer: errors, limits, config value types, environment variables, processes, devices, progress."""
