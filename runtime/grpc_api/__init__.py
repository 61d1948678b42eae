"""gRPC transport: servicers, server lifecycle, generated code."""
