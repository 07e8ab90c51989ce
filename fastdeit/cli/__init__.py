"""The command line: the typer app and what every command shares (base), the one option table
(options), the training and model commands (commands), the data commands (data_commands), the
installed entry point (entry). Nothing but the entry point imports this folder."""
