"""Backends: turn a (fused) graph into something that runs."""
