"""Protocol messages execbox writes itself (wire-compatible where they mirror Buildbarn's),
generated with grpcio-tools by scripts/gen-protos.sh; tests check the field numbers."""
