"""Command-line interface: one small module per subcommand, no model logic here."""
