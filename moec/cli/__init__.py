"""The ``moec`` command line: thin typer commands over the moec library."""
