"""Model files: the generated test model and GGUF checks, Hub downloads, and the catalogue of
trained models (what smoke, bench and the `models` command share)."""
