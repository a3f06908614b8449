"""wshub: a real-time WebSocket messaging hub."""

__version__ = "0.1.0"

__all__ = ["__version__"]
