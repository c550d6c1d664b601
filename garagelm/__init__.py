"""garagelm: powerful AI without a data centre."""

__version__ = "0.1.0"
