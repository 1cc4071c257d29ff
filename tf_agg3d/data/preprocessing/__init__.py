"""Scan -> cache entry (resampling grid, lung masks, cropping) and the resumable job runner."""
