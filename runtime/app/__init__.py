"""The composition root (composition.py: settings -> security -> repository -> core -> front
ends), the server's lifecycle (server.py) and the process supervisor of ``serve --processes N``."""
