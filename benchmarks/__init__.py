"""Measurements of the engine and the HTTP service; each script writes JSON, a PNG chart and a table."""
