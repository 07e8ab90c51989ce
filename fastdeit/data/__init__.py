"""Data sets: ImageFolder indexing and the embedded synthetic data set."""
