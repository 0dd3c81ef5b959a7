"""MESA reproduction: the small library behind the notebooks (see README)."""
