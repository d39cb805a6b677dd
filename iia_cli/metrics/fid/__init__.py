"""Frechet Inception Distance, in parts: weights, features, stats, sources, and compute, which chains them."""
