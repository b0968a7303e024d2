"""ftloop: help-center articles -> fine-tuned, evaluated intent classifier, on KFP."""

__version__ = "0.1.0"
