"""Small shared utilities (atomic file output, device selection)."""
