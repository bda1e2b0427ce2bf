"""Adapters that plug bnorm into other training frameworks (each imports its framework
only when imported itself)."""
