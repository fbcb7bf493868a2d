"""pacs-bridge: AI fracture detection between a PACS and ONNX Runtime."""

__all__ = ["__version__"]

__version__ = "0.1.0"
