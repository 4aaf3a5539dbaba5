"""The vLLM plugin: declared as an entry point, and refusing a lowrank folder with a one-line reason."""

from __future__ import annotations

import pytest
from helpers import run_in

from lowrank.errors import LowrankError


def test_vllm_entry_point_is_declared_and_refuses(installed_env, tmp_path):
    code = ("import importlib.metadata as m, sys\n"
            "[ep] = [e for e in m.entry_points(group='vllm.general_plugins') if e.name == 'lowrank']\n"
            "print(ep.value, ep.dist.name)\n"
            "register = ep.load()\n"
            "print(register(), 'vllm' in sys.modules)\n")
    done = run_in(installed_env, code, tmp_path)
    assert done.stdout.split() == ["lowrank.vllm_plugin:register", "lowrank", "None", "False"], done.stderr
    from lowrank.vllm_plugin import refuse

    with pytest.raises(LowrankError, match=r"vLLM cannot serve it yet; load it with transformers instead "
                                           r"\(pip install lowrank.*\(format version 2\)"):
        refuse({"quant_method": "lowrank", "format_version": 2})
