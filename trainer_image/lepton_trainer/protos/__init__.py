"""The Open Inference Protocol v2 gRPC definitions (Triton's .proto files, vendored)."""
