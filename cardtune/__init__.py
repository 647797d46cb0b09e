"""cardtune: a declarative, YAML-driven model registry and finetuning toolkit."""

__version__ = "0.1.0"
