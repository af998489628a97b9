"""The `vstore` command (DESIGN.md "Surfaces"): every command module registered on the one root app
of `vstore.cli.common`, in the order `vstore --help` lists them. This is the console script's entry
point (`vstore = "vstore.cli.main:app"`, and `python -m vstore.cli`); no command module imports it.
"""

from vstore.cli import attach, commands, dashboard, demo, export, lab_commands, verify
from vstore.cli.common import app

lab_commands.register(app)  # serve, shipper and the lab group
commands.register(app)  # status .. failback
dashboard.register(app)
verify.register(app)
export.register(app)
demo.register(app)
attach.register(app)  # attach, detach


def main() -> None:  # pragma: no cover - console entry
    app()
