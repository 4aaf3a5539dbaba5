"""Build hook: ship lowrank-autoload.pth at the top of site-packages, for wheels and editable installs.

Everything else about the package is in pyproject.toml. The .pth file makes Python import
lowrank_autoload at start-up (see that module); pip records it, so `pip uninstall lowrank` removes it.
"""

import os

from setuptools import Command, setup
from setuptools.command.build import build

PTH_FILE = "lowrank-autoload.pth"


class build_pth(Command):
    """Copy lowrank-autoload.pth to the root of what gets installed.

    A wheel's root is build_lib. In an editable install (PEP 660) setuptools builds a small
    wheel whose root is the install command's install_lib; build_lib is thrown away there.
    """

    description = "copy lowrank-autoload.pth to the top of the installed tree"
    user_options = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self):
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _target(self) -> str:
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        return os.path.join(root, PTH_FILE)

    def run(self):
        self.mkpath(os.path.dirname(self._target()))
        self.copy_file(PTH_FILE, self._target())

    def get_source_files(self):
        return [PTH_FILE]

    def get_outputs(self):
        return [os.path.join(self.build_lib, PTH_FILE)]

    def get_output_mapping(self):
        return {os.path.join(self.build_lib, PTH_FILE): PTH_FILE}


class build_with_pth(build):
    sub_commands = [*build.sub_commands, ("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})
