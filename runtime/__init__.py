"""edgewise.runtime: model packages, conversion and the gRPC serving runtime."""
