"""Probes: measure the truth by running the model with the perturbation applied."""

from .boundary import RayKL, measure_boundaries

__all__ = ["RayKL", "measure_boundaries"]
