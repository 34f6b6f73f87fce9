"""comfybridge: one small, robust API in front of many ComfyUI servers."""

__all__ = ["__version__"]

__version__ = "0.1.0"
