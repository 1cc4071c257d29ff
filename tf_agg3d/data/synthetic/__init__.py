"""Synthetic stand-ins for LUNA16 and DeepLesion, and the file writers the generators share."""
