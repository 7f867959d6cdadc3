"""dicom-node: a DICOM node that receives, routes, recompresses and archives or forwards images."""

__version__ = "0.1.0"
