"""The two refusals of Hugging Face interop, shared by the import and export drivers and every family."""


class UnsupportedConfig(ValueError):
    """A config field (or value) moec cannot express; the message names it."""


class NotExportable(ValueError):
    """A spec no supported HF family can represent; the message says which field."""
