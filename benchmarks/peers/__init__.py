"""Other ways to serve the same model, measured beside the service by ``benchmarks.scale``."""
