"""The protocol layer: protobuf in, status codes out. No torch here."""
