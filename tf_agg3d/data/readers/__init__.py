"""Scan readers: SimpleITK (any format it reads, DICOM folders) and tensorflow-io (DICOM)."""
