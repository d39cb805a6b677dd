"""Models and data: the model registry and adapters, the built-in testbed network, data sets and prompts."""
