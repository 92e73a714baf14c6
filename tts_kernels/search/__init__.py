"""Search drivers: whole test-time-compute searches built from the fused ops."""
from .beam_search import FROM_MODEL, BeamSearchOutput, beam_search

__all__ = ["FROM_MODEL", "BeamSearchOutput", "beam_search"]
