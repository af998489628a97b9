"""The README walkthrough is tested: every command between the walkthrough markers runs, in
order, through typer's CliRunner on a fresh lab in a tmp directory."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

from typer.testing import CliRunner

from jfs.cli import app as jfs_app
from vstore.cli.main import app as vstore_app

README = Path(__file__).resolve().parent.parent / "README.md"


def walkthrough() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- walkthrough -->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README has no walkthrough block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_install_and_test_commands():
    """The README opens with the install, test and demo commands, and CI runs the same test command."""
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(), re.S).group(1).splitlines()
    assert first_block[0] == "pip install -e '.[test]'" and first_block[1] == "pytest"
    assert first_block[2].startswith("vstore demo ")  # the main demo (test_demo.py runs it)
    assert "pytest" in (README.parent / ".ci" / "run").read_text()


def test_walkthrough_runs(tmp_path):
    """Every command of the README walkthrough succeeds in order and shows what the README says it shows."""
    runner = CliRunner()
    lab = tmp_path / "lab"
    outputs = []
    for line in walkthrough():
        line = line.replace("/tmp/lab", str(lab)).replace("/tmp/dashboard.svg", str(tmp_path / "d.svg"))
        stdin = None
        if "|" in line:
            left, line = (part.strip() for part in line.split("|", 1))
            stdin = shlex.split(left)[1] + "\n"  # echo "text"
        argv = shlex.split(line)
        if argv[:2] == ["rm", "-rf"]:
            shutil.rmtree(argv[2])
            continue
        app = {"vstore": vstore_app, "jfs": jfs_app}[argv[0]]
        result = runner.invoke(app, argv[1:], input=stdin)
        assert result.exit_code == 0, f"{line}\n{result.output}\n{result.exception}"
        outputs.append((line, result.stdout))
    reads = [out for line, out in outputs if " read " in f" {line} "]
    assert reads == ["written after the last ship\n"] * 2
    assert (tmp_path / "d.svg").read_text().count("A-&gt;D") >= 1
    final = json.loads(outputs[-1][1])
    assert final["sites"]["primary"]["role"] == "primary"
    assert {p["name"]: p["state"] for p in final["pairs"]} == {"A->C": "Duplex", "A->D": "Duplex"}
