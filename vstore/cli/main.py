"""The `vstore` command: the core commands plus the dashboard, verify and demo, assembled in one
place so that no command module has to import another to register it."""

from vstore.cli import dashboard, demo, verify
from vstore.cli.commands import app

dashboard.register(app)
verify.register(app)
demo.register(app)


def main() -> None:  # pragma: no cover - console entry
    app()
