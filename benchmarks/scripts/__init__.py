"""One-off measurement scripts (`python -m benchmarks.scripts.NAME`): they time and score our own
training and export code, so unlike the `benchmarks` library they import reviewkd and export."""
