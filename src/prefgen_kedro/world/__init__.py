"""The agent world: a procedural stand-in for the paper's agent dataset (no torch here)."""
