"""The package version (what ``export`` and ``cli`` read instead of importing the package root)."""

__version__ = "0.1.0"
