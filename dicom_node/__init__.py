"""DICOM Application Entity (C-ECHO, C-STORE): built by the DICOM node issue."""
