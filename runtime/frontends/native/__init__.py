"""The native gRPC front end: gRPC's C++ server (``_front.cc``), its build and
its thin binding."""
