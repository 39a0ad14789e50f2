"""moec's version, importable without the package's public API (moec/__init__ imports the compiler on use)."""

__version__ = "0.1.0"
