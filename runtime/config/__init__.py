"""One typed settings schema (flags, EDGEWISE_* environment, files) and the
resource budget its defaults are derived from; below every capability."""
