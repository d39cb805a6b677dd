"""Small analytic denoisers shared by the tests (imported as a module and usable as a python factory)."""

import torch


class DiagonalGaussian:
    """Data N(mu, diag(var)): per-pixel scales make the IIA quantities linearly independent."""

    shape, sigma_min, sigma_max, dtype = (1, 4, 4), 0.002, 80.0, torch.float64

    def __init__(self):
        self.mu = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64).view(1, 1, 4, 4)
        self.var = torch.linspace(0.01, 1.0, 16, dtype=torch.float64).view(1, 1, 4, 4)

    def __call__(self, x, sigma, class_labels=None):
        s2 = sigma.view(-1, 1, 1, 1).to(torch.float64) ** 2
        return self.mu + self.var / (self.var + s2) * (x - self.mu)
