"""The protobuf/gRPC code generated from proto/ (``make proto``) and its generator;
imported by the core, the front ends and the client."""
