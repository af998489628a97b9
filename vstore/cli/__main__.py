"""`python -m vstore.cli`: the same command as the `vstore` script."""

from vstore.cli.main import app

app()
