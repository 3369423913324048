"""The state on disk: the checkpoint format and PPOKL's full training state in and out of it."""
