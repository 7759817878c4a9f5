"""Layer allocation policies; ``owl`` holds all of OWL (its outlier ratios and keep counts)."""
