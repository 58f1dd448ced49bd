"""Issue 27: the README's simulation command, run several times in a row from a fresh copy of
the repository, with a PATH that does not hold this Python's scripts folder (a virtual
environment that was not activated). Before: FLWR_HOME was ``flower_app/flwr-home``, inside
the app that ``flwr run`` packages, so every run packaged the copies of the runs before it one
level deeper and the 5th failed ("exceeds the maximum directory depth of 10"); and the local
SuperLink started ``flower-superexec`` by name, which a PATH without the venv does not find.

The local simulation SuperLink is started by the test (`simulation_superlink`, the command
line ``flwr`` would run, on free loopback ports) so that it is stopped by PID; the result
folder is made absolute (the ServerApp's working directory is the SuperLink's)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from fedlora.flower.local import check_home, exe, simulation_superlink, stop

pytest.importorskip("ray")
pytestmark = [pytest.mark.flower, pytest.mark.simulation]

ROOT = Path(__file__).resolve().parents[1]


def _readme_command() -> str:
    text = (ROOT / "README.md").read_text()
    (line,) = re.findall(r"^FLWR_HOME=\S+ flwr run flower_app local-simulation .*$", text, re.M)
    return line


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_a_flower_home_inside_the_app_is_refused(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(ROOT / "flower_app", app)
    with pytest.raises(ValueError, match="inside the Flower app"):
        check_home(app / "flwr-home")
    with pytest.raises(ValueError, match="absolute"):
        check_home(Path("flwr-home"))
    assert check_home(tmp_path / "flwr-home") == tmp_path / "flwr-home"


def test_the_readme_simulation_command_runs_again_and_again(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "flower_app", clone / "flower_app")
    (clone / "flwr-home").mkdir()
    shutil.copy(ROOT / "flwr-home" / "config.toml", clone / "flwr-home" / "config.toml")
    before = _files(clone / "flower_app")
    words = shlex.split(_readme_command().replace("$PWD", str(clone)))
    home = Path(words[0].split("=", 1)[1])
    assert home == clone / "flwr-home"  # outside the app it packages
    out = clone / "runs" / "sim"
    argv = [exe("flwr"), *words[2:]]
    argv[-1] = argv[-1].replace('result-dir="runs/sim"', f'result-dir="{out}"')
    assert f'result-dir="{out}"' in argv[-1] and "overwrite=true" in argv[-1]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no venv, no pyenv shims
    with open(tmp_path / "superlink.log", "w") as log:
        link, env = simulation_superlink(home, log)
        try:
            for i in range(3):
                proc = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True,
                                      timeout=600)  # fmt: skip
                text = proc.stdout + proc.stderr
                assert proc.returncode == 0 and (out / "result.json").exists(), (i, text[-4000:])
                result = json.loads((out / "result.json").read_text())
                assert [r["round"] for r in result["rounds"]] == [1, 2], i
                (out / "result.json").unlink()  # the next run writes its own
        finally:
            stop([link])
    assert _files(clone / "flower_app") == before  # Flower wrote nothing inside the app
    assert (home / "apps").is_dir()  # its installs are in the home, beside the app
