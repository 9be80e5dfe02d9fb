"""The trainer's parts: its measurements (measure, memory) and how the model runs (parallelize)."""
