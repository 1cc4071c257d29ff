"""Scans, readers, LUNA16 and DeepLesion files, preprocessing, the cache, synthetic data."""
