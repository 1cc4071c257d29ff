"""The LUNA16 download: its folder layout and its CSV files (annotations, candidates, lists)."""
