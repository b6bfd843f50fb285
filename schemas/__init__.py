"""JSON Schema (2020-12) files for every record kind and sidecar file; loaded by flamingo_data.core.schema."""
