"""Which ``pip`` extra installs an optional dependency, so a command can say so in one line."""

from __future__ import annotations

__all__ = ["EXTRAS", "missing_extra"]

#: Top-level module of an optional dependency -> the extra of ``pyproject.toml`` that installs it.
EXTRAS = {"transformers": "hf", "accelerate": "hf", "gguf": "hf", "matplotlib": "plot", "redis": "redis",
          "boto3": "s3", "botocore": "s3", "cupy": "gpu"}


def missing_extra(exc: ModuleNotFoundError, command: str) -> str | None:
    """The one-line hint for ``exc`` raised by ``command``, or None when it is not an optional dependency."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return None
    return f"{command}: needs the [{extra}] extra (module {module!r} is not installed): pip install 'kdn[{extra}]'"
