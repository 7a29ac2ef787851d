"""Probes: measure the truth by running the model with the perturbation applied."""

from .boundary import measure_boundaries, prelogit_kl

__all__ = ["measure_boundaries", "prelogit_kl"]
