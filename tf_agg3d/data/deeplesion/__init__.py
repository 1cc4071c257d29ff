"""DeepLesion -> the cache: DL_info.csv, lesions, PNG slices, one series, the whole conversion."""
