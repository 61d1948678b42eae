"""The command line: argv -> config -> app, one module per verb group."""
