"""Package version (single source for code; pyproject carries the same string)."""

__version__ = "0.1.2"
