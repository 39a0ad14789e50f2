"""The reference interpreter: the eager ground truth for every backend (``moec.reference_model``)."""

from moec.backends.reference.interpreter import ReferenceModel

__all__ = ["ReferenceModel"]
