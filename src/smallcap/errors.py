"""The exception types the CLI reports as a clean one-line message instead of a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType


class SmallCapError(Exception):
    """A problem with the user's input or environment, worded for the user (file, reason, fix)."""


class MissingExtraError(SmallCapError):
    """An optional dependency is not installed; the message names the pip extra that installs it."""

    def __init__(self, module_name: str, extra: str, purpose: str, reason: str | None = None) -> None:
        self.module_name, self.extra, self.purpose = module_name, extra, purpose
        detail = f"'{module_name}' is not installed" if reason is None else f"'{module_name}' failed to import: {reason}"
        super().__init__(f"{purpose} needs the optional extra: pip install 'smallcap[{extra}]' ({detail})")


def require_extra(module_name: str, extra: str, purpose: str) -> ModuleType:
    """Import and return `module_name`, or raise MissingExtraError naming `pip install 'smallcap[extra]'`.

    `purpose` says what needs it, worded to start a sentence ("Reading video files").
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise MissingExtraError(module_name, extra, purpose) from None
        raise MissingExtraError(module_name, extra, purpose, reason=str(error)) from None
    except ImportError as error:  # installed but broken (a missing shared library, a wrong version)
        raise MissingExtraError(module_name, extra, purpose, reason=str(error).splitlines()[0]) from None
