"""mmgrpo: group-relative policy optimization across modalities."""

__version__ = "0.1.0"
