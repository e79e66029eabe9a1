"""The package version (the same as pyproject.toml's ``version``: change both)."""

__version__ = "0.4.0.dev0"
