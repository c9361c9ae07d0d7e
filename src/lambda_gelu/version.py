"""The package version, in a module that imports nothing else of lambda-gelu."""

__version__ = "0.2.0.dev0"
