"""Importing lowrank tells SciPy's OpenBLAS threads to sleep when idle, and leaves torch's OpenMP threads to
libgomp's default wait (a short spin), unless the user said otherwise.

Both settings are read once, when a runtime loads (torch's OpenMP, SciPy's OpenBLAS), so they must be
in the environment before torch or SciPy is first imported: each check starts a fresh interpreter and
records the environment at the moment each of them is imported.

Cross-cutting (tests/ mirrors lowrank/ otherwise): a property of importing the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SETTINGS = {"OMP_WAIT_POLICY": "", "OPENBLAS_THREAD_TIMEOUT": "4"}  # "": not set (OMP_WAIT_POLICY=PASSIVE until stop 34)

# Run in a fresh interpreter: an import finder that looks on (never loads) and notes the settings as they
# stand when torch and SciPy are first asked for, then lowrank and the SciPy linear algebra it uses.
WATCH = """
import json, os, sys
names = {names!r}
seen = {{}}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "scipy") and name not in seen:
            seen[name] = {{k: os.environ.get(k, "") for k in names}}
        return None
sys.meta_path.insert(0, Watch())
import lowrank, scipy.linalg
print(json.dumps(seen))
"""


def settings_at_first_import(preset: dict[str, str]) -> dict[str, dict[str, str]]:
    """For torch and scipy: the SETTINGS' values when each was first imported, in an interpreter started
    with `preset` (and none of SETTINGS otherwise) that runs `import lowrank`."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(preset)
    code = WATCH.format(names=sorted(SETTINGS))
    printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(printed.splitlines()[-1])


def test_import_sets_the_idle_waits_before_torch_and_scipy_load():
    seen = settings_at_first_import({})
    assert set(seen) == {"torch", "scipy"}
    assert seen["torch"] == SETTINGS and seen["scipy"] == SETTINGS


def test_a_users_own_settings_are_kept():
    own = {"OMP_WAIT_POLICY": "ACTIVE", "OPENBLAS_THREAD_TIMEOUT": "28"}
    seen = settings_at_first_import(own)
    assert seen == {"torch": own, "scipy": own}
