"""Optimisers that turn feature volumes into displacement fields (ConvexAdam)."""
