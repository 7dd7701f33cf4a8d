"""Training-side tools for the codevista models (corpus building)."""
