"""The command line: one module per subcommand, shared options, the exit-code mapping."""
