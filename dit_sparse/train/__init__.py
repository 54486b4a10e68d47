"""Training of the embedded tiny text-to-video model (run on a GPU)."""
