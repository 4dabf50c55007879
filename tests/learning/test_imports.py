"""The server imports the config and result models: they must not pull in torch."""

from __future__ import annotations

import subprocess
import sys


def test_light_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import learning, learning.config, learning.examples, learning.reports, learning.gates; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
