"""Front ends, adapters only: wire format <-> the core's request and response, and
``EdgewiseError`` -> status from one table (grpcio, native gRPC, HTTP/REST V2, security)."""
