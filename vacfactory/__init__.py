"""vacfactory: an autonomous VM lifecycle factory for grid and cloud sites (a Python 3 Vac)."""

__version__ = "0.1.0"
