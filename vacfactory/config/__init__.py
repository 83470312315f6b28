"""Configuration: the option table, loading and validation (see docs/configuration.md)."""
