"""comfybridge: one small, robust API in front of many ComfyUI servers."""

__version__ = "0.1.0"
