"""Experts, routing and the Mixture-of-Experts layer (see issue: model)."""

__all__ = []
