"""Attention layers (see issue: model)."""

__all__ = []
