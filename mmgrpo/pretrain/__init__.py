"""Scripts that build the embedded tiny models in assets/ (run as `python -m mmgrpo.pretrain.<name>`)."""
