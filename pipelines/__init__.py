"""One adapter per Diffusers model family."""
