"""Layer-sequential calibration: the engine that runs one decoder layer at a time, and its statistics."""
