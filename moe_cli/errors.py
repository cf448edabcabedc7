"""User-facing errors: each carries one line that the CLI prints without a traceback (exit code 2)."""


class MoeError(Exception):
    """An error caused by the user's input; its message is one line that names what was expected."""


class ConfigError(MoeError, ValueError):
    """A bad option, recipe field or combination of settings (also a ValueError, as for bad arguments)."""


class CheckpointError(MoeError):
    """A missing, corrupt or mismatching checkpoint file."""


class ModelSourceError(MoeError):
    """A model name, hub id or weights file that cannot be resolved or loaded."""
