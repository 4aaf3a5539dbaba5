"""Start-up hook: lowrank folders load with `from_pretrained` in processes that never import lowrank.

`lowrank-autoload.pth`, installed into site-packages with the package (wheel or editable), imports
this module when the interpreter starts. It imports neither torch nor transformers: it puts a
finder on `sys.meta_path` that waits for `transformers.quantizers` to be imported and then
registers lowrank's quantizer (`lowrank.hf_integration.register`). Set LOWRANK_AUTOLOAD=0 to
switch it off; `pip uninstall lowrank` removes it.
"""

import os
import sys

WATCHED_MODULE = "transformers.quantizers"
SWITCH = "LOWRANK_AUTOLOAD"


def enabled() -> bool:
    """False when the environment variable LOWRANK_AUTOLOAD is 0, false, no or off."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def register_lowrank() -> None:
    """Register lowrank's quantizer with transformers; warn, never raise, when that fails."""
    if "lowrank" in sys.modules:  # imported, or being imported: `import lowrank` registers it itself
        return
    try:
        from lowrank import hf_integration

        hf_integration.register()
    except Exception as exc:  # a broken lowrank must not break every transformers import
        import warnings

        warnings.warn(f"lowrank could not register its transformers quantizer ({type(exc).__name__}: {exc}); "
                      f"lowrank folders will refuse to load until this is fixed (set {SWITCH}=0 to silence)",
                      RuntimeWarning, stacklevel=2)


class _RegisterAfterExec:
    """Wraps the loader of `transformers.quantizers`: runs it, then registers lowrank."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        register_lowrank()


class WaitForTransformers:
    """A meta-path finder that answers for `transformers.quantizers` only, once, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != WATCHED_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on sys.meta_path (or register at once if transformers' quantizers are loaded)."""
    if not enabled():
        return
    if WATCHED_MODULE in sys.modules:
        register_lowrank()
    elif not any(isinstance(finder, WaitForTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, WaitForTransformers())


install()
