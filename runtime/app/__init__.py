"""The composition root: config -> security -> repository -> core -> front ends; the
process supervisor of ``serve --processes N``."""
