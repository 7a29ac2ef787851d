"""Probes: measure the truth by running the model with the perturbation applied."""

from .boundary import RayKL, measure_boundaries, measure_from_suffix

__all__ = ["RayKL", "measure_boundaries", "measure_from_suffix"]
