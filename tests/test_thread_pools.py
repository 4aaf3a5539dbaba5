"""Importing lowrank tells the thread pools under it to sleep when idle, unless the user said otherwise.

Both settings are read once, when the runtime loads (torch's OpenMP, SciPy's OpenBLAS), so they must
be in the environment before either loads: each check starts a fresh interpreter.

Cross-cutting (tests/ mirrors lowrank/ otherwise): a property of importing the package.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


def environment_after_import(preset: dict[str, str]) -> dict[str, str]:
    """The SETTINGS' values seen inside a fresh interpreter after `import lowrank`, started with `preset`."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(preset)
    code = ("import os, lowrank; "
            f"print('\\n'.join(k + '=' + os.environ.get(k, '') for k in {sorted(SETTINGS)!r}))")
    printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in printed.splitlines())


def test_import_sets_the_idle_waits_before_the_runtimes_load():
    assert environment_after_import({}) == SETTINGS


@pytest.mark.parametrize("name,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("OPENBLAS_THREAD_TIMEOUT", "28")])
def test_a_users_own_setting_is_kept(name, value):
    seen = environment_after_import({name: value})
    assert seen[name] == value
    assert all(seen[other] == SETTINGS[other] for other in SETTINGS if other != name)
