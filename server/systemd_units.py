"""`engrain systemd install`: render the unit templates in `systemd/` with this install's real paths."""

from __future__ import annotations

import getpass
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from train_worker.settings import Settings

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[1]
TEMPLATES = SOURCE / "systemd"
UNITS = ("engrain-train.path", "engrain-train.service", "engrain-host.service", "engrain-mcp.service")


def engrain_executable() -> Path:
    """The console script next to this interpreter (what `make install` puts in .venv/bin)."""
    candidate = Path(sys.executable).with_name("engrain")
    if candidate.exists():
        return candidate
    found = shutil.which("engrain")
    if found is None:
        raise FileNotFoundError("cannot find the `engrain` executable; install engrain first (make install)")
    return Path(found).resolve()


def render(settings: Settings, *, user: bool) -> dict[str, str]:
    """Each unit's text with the placeholders filled in."""
    if not TEMPLATES.is_dir():
        raise FileNotFoundError(f"unit templates not found in {TEMPLATES}; run from a source checkout of engrain")
    values = {
        "@HOME@": str(settings.layout.home),
        "@ENGRAIN@": str(engrain_executable()),
        "@SOURCE@": str(SOURCE),
        "@SYSTEMD_USER@": "true" if user else "false",
        "@WANTED_BY@": "default.target" if user else "multi-user.target",
        "@USER_LINE@": "" if user else f"User={getpass.getuser()}\n",
    }
    rendered = {}
    for name in UNITS:
        text = (TEMPLATES / name).read_text()
        for key, value in values.items():
            text = text.replace(key, value)
        rendered[name] = text
    return rendered


def unit_dir(user: bool) -> Path:
    return Path.home() / ".config" / "systemd" / "user" if user else Path("/etc/systemd/system")


def installed_home(folder: Path) -> Path | None:
    """The ENGRAIN_HOME the host unit already installed in `folder` serves, if any."""
    unit = folder / "engrain-host.service"
    try:
        text = unit.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Environment=ENGRAIN_HOME="):
            return Path(line.split("=", 2)[2]).expanduser().resolve()
    return None


def install(settings: Settings, *, user: bool, dry_run: bool, target: Path | None, enable: bool) -> int:
    units = render(settings, user=user)
    if dry_run:
        for name, text in units.items():
            print(f"# {name}\n{text}")
        return 0
    folder = target or unit_dir(user)
    other = installed_home(folder)
    if other is not None and other != settings.layout.home:
        log.error(
            "the engrain units in %s serve the home %s; installing them for %s would take them over (the unit names "
            "are fixed). Disable and remove those units first, or run this home without systemd "
            "(ENGRAIN_HOST_CONTROLLER=lease and `engrain up`).",
            folder,
            other,
            settings.layout.home,
        )
        return 1
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        (folder / name).write_text(text)
        log.warning("wrote %s", folder / name)
    settings.layout.ensure()  # the path unit watches folders that must exist
    systemctl = ["systemctl", "--user"] if user else ["systemctl"]
    steps = [
        [*systemctl, "daemon-reload"],
        [*systemctl, "enable", "--now", "engrain-train.path", "engrain-host.service"],
    ]
    if enable:
        for step in steps:
            done = subprocess.run(step, check=False)
            if done.returncode != 0:
                log.error("`%s` failed; run it yourself once systemd is available", " ".join(step))
                return 1
    else:
        print("Next:\n" + "\n".join("  " + " ".join(step) for step in steps))
        print(f"Optional MCP over HTTP: {' '.join(systemctl)} enable --now engrain-mcp.service")
    return 0
