"""Benchmarks against reference implementations (run as `python -m mmgrpo.bench.<name>`)."""
