"""Probes: measure the truth by running the model with the perturbation applied."""

from .boundary import LinearRayKL, RayKL, measure_boundaries, measure_from_suffix, measure_near

__all__ = ["LinearRayKL", "RayKL", "measure_boundaries", "measure_from_suffix", "measure_near"]
