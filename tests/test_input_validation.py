"""Bad input is refused in one sentence before anything happens: topology.toml keys, types, ports
and addresses; out-of-range numbers on the vstore and jfs command lines; output files whose
directory does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from jfs.cli import app as jfs_app
from vstore.blocks.errors import TricopyError
from vstore.cli.common import check_output_path
from vstore.cli.main import app as vstore_app
from vstore.lab.topology import TOPOLOGY_FILE, load_topology
from vstore.procedures.create import init_lab

BS = 4096


def run(app: typer.Typer, *args: object, ok: bool = True) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def vstore(*args: object, ok: bool = True) -> Result:
    return run(vstore_app, *args, ok=ok)


def one_sentence(result: Result, code: int = 1) -> str:
    """The single stderr line of a refused command (no traceback), without the "error:" prefix."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, ArithmeticError)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0].removeprefix("error: ")


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    path = tmp_path / "lab"
    init_lab(path, size=64 * BS, base_port=17401)
    return path


def edit_topology(lab: Path, old: str, new: str) -> None:
    path = lab / TOPOLOGY_FILE
    text = path.read_text()
    pattern = re.compile(old, re.MULTILINE)
    assert pattern.search(text), old
    path.write_text(pattern.sub(new, text, count=1))


def append_topology(lab: Path, text: str) -> None:
    with open(lab / TOPOLOGY_FILE, "a") as f:
        f.write(text)


# -- topology.toml ------------------------------------------------------------------------------
def test_unknown_site_key_names_the_key_its_table_and_the_known_keys(lab: Path) -> None:
    """A misspelt key in [sites.primary] is refused naming the key, the table, the file, the line the key
    is written on and the known keys."""
    edit_topology(lab, r"^port = 17401$", "prot = 17401")
    line = (lab / TOPOLOGY_FILE).read_text().splitlines().index("prot = 17401") + 1
    message = one_sentence(vstore("status", lab, ok=False))
    assert message == (f"unknown key 'prot' in [sites.primary] of {lab / TOPOLOGY_FILE}, line {line}; "
                       "known keys: host, port")


def test_a_wrong_value_in_an_inline_table_names_its_line(lab: Path) -> None:
    """A site written as an inline table: a value of the wrong type there names the line of that table."""
    text = (lab / TOPOLOGY_FILE).read_text()
    text = re.sub(r'\[sites\.async\]\nhost = "([^"]*)"\nport = \d+\n', '', text)
    text = text.replace("[sites.primary]", '[sites]\nasync = { host = "127.0.0.1", port = "x" }\n\n[sites.primary]')
    (lab / TOPOLOGY_FILE).write_text(text)
    line = text.splitlines().index('async = { host = "127.0.0.1", port = "x" }') + 1
    assert f"port in [sites.async] of {lab / TOPOLOGY_FILE}, line {line} must be an integer" in \
        one_sentence(vstore("status", lab, ok=False))


@pytest.mark.parametrize(("edit", "words"), [
    ((r"^\[lab\]$", "[lab]\nprotcet = true"), "unknown key 'protcet' in [lab]"),
    ((r"^\[sites.sync\]$", "[sites.snyc]"), "unknown key 'snyc' in [sites]"),
    ((r"^protect = true$", 'protect = "no"'), "protect in [lab]"),
    ((r"^size = \d+$", 'size = "64M"'), "size in [lab]"),
    ((r"^volumes = 1$", "volumes = true"), "volumes in [lab]"),
    ((r"^port = 17402$", 'port = "17402"'), "port in [sites.sync]"),
    ((r"^port = 17402$", "# no port"), "missing key 'port' in [sites.sync]"),
])
def test_wrong_keys_and_types_in_topology_are_one_sentence(lab: Path, edit: tuple[str, str], words: str) -> None:
    """An unknown key, a value of the wrong type or a missing port is one sentence naming key and table."""
    edit_topology(lab, *edit)
    assert words in one_sentence(vstore("status", lab, ok=False))


@pytest.mark.parametrize(("extra", "words"), [
    ("\n[fault]\nx = 1\n", "unknown key 'fault' at the top level"),
    ('\n[links.primary-snyc]\nvia = "127.0.0.1:9000"\n', "unknown key 'primary-snyc' in [links]"),
    ('\n[links.primary-sync]\nvai = "127.0.0.1:9000"\n', "unknown key 'vai' in [links.primary-sync]"),
    ('\n[links.primary-sync]\nvia = "127.0.0.1:x"\n', "must be HOST:PORT"),
    ('\n[links.primary-sync]\nvia = "127.0.0.1:70000"\n', "is 70000; a port is 1-65535"),
    ('\n[links.primary-sync]\nvia = "127.0.0.1:17403"\n', "site async and link primary-sync (via) both use"),
])
def test_bad_tables_and_links_in_topology_are_one_sentence(lab: Path, extra: str, words: str) -> None:
    """Unknown tables, unknown links, a bad or reused `via` address are refused in one sentence."""
    append_topology(lab, extra)
    assert words in one_sentence(vstore("status", lab, ok=False))


@pytest.mark.parametrize("port", [0, 70000, -1])
def test_port_outside_1_to_65535_is_refused_by_lab_up(lab: Path, port: int) -> None:
    """A site port outside 1-65535 makes `lab up` refuse in one sentence (no OverflowError), starting nothing."""
    edit_topology(lab, r"^port = 17401$", f"port = {port}")
    message = one_sentence(vstore("lab", "up", lab, ok=False))
    assert f"the port of site primary is {port}; a port is 1-65535" in message
    assert not (lab / "run").exists() or not any((lab / "run").glob("*.pid"))


def test_privileged_site_port_needs_the_opt_in(lab: Path) -> None:
    """A site port below 1024 is refused unless [lab] allow_privileged_ports = true says otherwise."""
    edit_topology(lab, r"^port = 17401$", "port = 80")
    message = one_sentence(vstore("status", lab, ok=False))
    assert "privileged" in message and "allow_privileged_ports = true under [lab]" in message
    edit_topology(lab, r"^\[lab\]$", "[lab]\nallow_privileged_ports = true")
    topo = load_topology(lab)
    assert topo.sites["primary"].port == 80 and topo.allow_privileged_ports
    assert "allow_privileged_ports = true" in topo.to_toml()


def test_link_proxy_may_use_any_port(lab: Path) -> None:
    """A link's `via` is only connected to: a port below 1024 there needs no opt-in."""
    append_topology(lab, '\n[links.primary-sync]\nvia = "127.0.0.1:9"\n')
    assert load_topology(lab).peer_address("primary", "sync").port == 9


def test_two_sites_on_one_address_are_refused(lab: Path) -> None:
    """Two sites on the same host:port are refused naming both."""
    edit_topology(lab, r"^port = 17403$", "port = 17402")
    message = one_sentence(vstore("status", lab, ok=False))
    assert "site sync and site async both use 127.0.0.1:17402" in message


def test_lab_init_refuses_ports_past_65535(tmp_path: Path) -> None:
    """`init_lab` whose third port would pass 65535 is refused before the directory is made."""
    with pytest.raises(TricopyError, match="a port is 1-65535"):
        init_lab(tmp_path / "high", size=64 * BS, base_port=65534)
    assert not (tmp_path / "high").exists()


def test_default_topology_round_trips(lab: Path) -> None:
    """A topology written by `lab init` loads again unchanged and without the privileged opt-in."""
    topo = load_topology(lab)
    assert not topo.allow_privileged_ports and "allow_privileged_ports" not in topo.to_toml()
    (lab / TOPOLOGY_FILE).write_text(topo.to_toml())
    assert load_topology(lab) == topo


# -- command-line numbers -----------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["lab", "init", "{tmp}/x", "--base-port", "70000"],
    ["lab", "init", "{tmp}/x", "--base-port", "80"],
    ["lab", "init", "{tmp}/x", "--base-port", "65534"],
    ["lab", "init", "{tmp}/x", "--volumes", "0"],
    ["lab", "init", "{tmp}/x", "--volumes", "65"],
])
def test_lab_init_numbers_out_of_range_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    """`lab init` with a port or volume count out of range exits 2 and creates nothing."""
    r = vstore(*[a.format(tmp=tmp_path) for a in args], ok=False)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args", [
    ["ship", "{lab}", "--max", "-1"],
    ["ship", "{lab}", "--follow", "--duration", "-1"],
    ["read", "{lab}", "--site", "sync", "--volume", "C", "--lba", "-1"],
    ["read", "{lab}", "--site", "sync", "--volume", "C", "--lba", "0", "--count", "0"],
])
def test_vstore_numbers_out_of_range_are_usage_errors(lab: Path, args: list[str]) -> None:
    """Negative counts and block numbers on `ship` and `read` exit 2 naming the option."""
    r = vstore(*[a.format(lab=lab) for a in args], ok=False)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--" + args[-2].lstrip("-") in r.output


def test_ship_max_zero_ships_nothing(lab: Path) -> None:
    """`ship --max 0` is accepted and ships no entry."""
    assert "shipped 0 entries" in vstore("ship", lab, "--max", "0").stdout


@pytest.mark.parametrize(("option", "value"), [("--inodes", "0"), ("--inodes", "-5"), ("--block-size", "0"),
                                               ("--block-size", "100000"), ("--log-blocks", "0")])
def test_jfs_mkfs_numbers_out_of_range_are_usage_errors(tmp_path: Path, option: str, value: str) -> None:
    """`jfs mkfs` with a non-positive inode count, log size or an impossible block size exits 2, no image made."""
    image = tmp_path / "fs.img"
    r = run(jfs_app, "mkfs", image, "--size", "1M", option, value, ok=False)
    assert r.exit_code == 2 and "Traceback" not in r.output and option in r.output
    assert not image.exists()


# -- output paths -------------------------------------------------------------------------------
def test_read_out_into_a_missing_directory_is_one_sentence(lab: Path, tmp_path: Path) -> None:
    """`read --out` into a missing directory says which directory does not exist; no traceback."""
    target = tmp_path / "missing" / "x.bin"
    message = one_sentence(vstore("read", lab, "--site", "sync", "--volume", "C", "--lba", 0, "--out", target,
                                  ok=False))
    assert message == f"cannot write {target}: the directory {target.parent} does not exist"


def test_read_out_onto_a_directory_is_one_sentence(lab: Path, tmp_path: Path) -> None:
    """`read --out` naming a directory is refused in one sentence."""
    message = one_sentence(vstore("read", lab, "--site", "sync", "--volume", "C", "--lba", 0, "--out", tmp_path,
                                  ok=False))
    assert message == f"cannot write {tmp_path}: it is a directory; name a file in it"


def test_read_out_writes_the_blocks(lab: Path, tmp_path: Path) -> None:
    """`read --out` into an existing directory writes exactly the blocks read."""
    target = tmp_path / "c.bin"
    vstore("read", lab, "--site", "sync", "--volume", "C", "--lba", 0, "--count", 2, "--out", target)
    assert target.read_bytes() == (lab / "sync" / "C.img").read_bytes()[:2 * BS]


def test_dashboard_svg_into_a_missing_directory_is_one_sentence(lab: Path, tmp_path: Path) -> None:
    """`dashboard --svg` into a missing directory says which directory does not exist; no traceback."""
    target = tmp_path / "missing" / "frame.svg"
    message = one_sentence(vstore("dashboard", lab, "--svg", target, ok=False))
    assert message == f"cannot write {target}: the directory {target.parent} does not exist"


def test_check_output_path_accepts_a_new_file_and_refuses_a_file_as_directory(tmp_path: Path) -> None:
    """The shared output check accepts a new file in an existing directory and refuses a file used as one."""
    assert check_output_path(tmp_path / "new.svg") == tmp_path / "new.svg"
    (tmp_path / "plain").write_text("x")
    with pytest.raises(TricopyError, match="is not a directory"):
        check_output_path(tmp_path / "plain" / "x.svg")
