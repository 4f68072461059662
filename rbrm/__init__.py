"""rbrm: safety alignment via preference re-ranking and representation-based reward modeling."""

__version__ = "0.4.2"
