"""The torch backend: fused graph -> a readable, torch.compile-able ``model.py``."""
