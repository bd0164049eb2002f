"""The engine layer: admission, scheduling, streaming and cancellation; no gRPC."""
