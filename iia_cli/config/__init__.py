"""The experiment config: its schema, loading and ``--set`` overrides, and the built-in default.yaml."""
