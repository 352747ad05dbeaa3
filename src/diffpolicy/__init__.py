"""diffpolicy: Diffusion Policy as practical software."""

__version__ = "0.1.0"
