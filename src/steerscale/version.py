"""The library version, at the bottom of the package so that every layer can record it without importing the top."""

__version__ = "0.1.0"
