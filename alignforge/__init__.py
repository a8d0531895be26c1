"""alignforge: language models in, alignment datasets out."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
