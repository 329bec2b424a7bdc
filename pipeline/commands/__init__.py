"""One module per subcommand of `python -m pipeline`, each with `NAME`,
`add_parser(commands)` and `run(args) -> exit status`; flags.py holds what the
config-reading commands share."""
