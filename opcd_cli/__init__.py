"""opcd: On-Policy Context Distillation, from the command line."""

__version__ = "0.1.0"
