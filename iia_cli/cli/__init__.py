"""The command line (top layers): the Typer app, its command groups, the options they share and the input checks."""
