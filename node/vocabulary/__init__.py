"""DICOM vocabulary: transfer syntaxes and DIMSE statuses as the standard defines them, facts
with no dependency on the node, shared by configuration and every stage."""
