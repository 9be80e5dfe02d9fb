"""lmtune: run LM-pretraining experiments as sweep files on Ray Tune + Optuna, get frontier tables and locked defaults."""

__version__ = "0.1.0"
