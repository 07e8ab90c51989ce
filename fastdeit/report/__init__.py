"""What runs and benchmarks leave to read: a run's HTML report (run_report, page), benchmark results
files and their provenance (provenance)."""
