"""Quality-vs-speed evaluation."""
