"""The ``agg3d-*`` console scripts: declared in setup.cfg, installed, each a callable."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys

import pytest
from cli_testlib import REPO

EXPECTED = {
    "agg3d-train",
    "agg3d-predict",
    "agg3d-evaluate",
    "agg3d-export",
    "agg3d-preprocess",
    "agg3d-preprocess-deeplesion",
    "agg3d-demo",
    "agg3d-demo-deeplesion",
    "agg3d-serve",
    "agg3d-client",
    "agg3d-synthetic-luna16",
    "agg3d-synthetic-deeplesion",
    "agg3d-crossval",
    "agg3d-ablate",
    "agg3d-beam-preprocess",
    "agg3d-beam-predict",
}


def _declared() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)


def test_setup_cfg_declares_every_command():
    assert set(_declared()) == EXPECTED


def test_installed_console_scripts_match_setup_cfg():
    from importlib.metadata import entry_points

    installed = {
        ep.name: ep.value
        for ep in entry_points(group="console_scripts")
        if ep.name.startswith("agg3d-")
    }
    # A stale install (entry points added since): pip install -e . again.
    assert installed == _declared()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_console_script_resolves_to_a_callable(name):
    # One process each: a command module defines its absl flags when imported, and two
    # commands' flags cannot share one process.
    code = (
        "from importlib.metadata import entry_points\n"
        f"(ep,) = [e for e in entry_points(group='console_scripts') if e.name == {name!r}]\n"
        "assert callable(ep.load()), ep\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
