"""Rules for names that appear in a manifest, so none can become a path out of the directory."""

from __future__ import annotations

from checkpoint_format.errors import UnsafeNameError

MAX_NAME_LEN = 512
_FORBIDDEN = ("/", "\\", "\x00")


def name_problem(name: object) -> str | None:
    """Why `name` is not an allowed tensor or file name, or None when it is allowed."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not 1 <= len(name) <= MAX_NAME_LEN:
        return f"has length {len(name)}, allowed 1..{MAX_NAME_LEN}"
    if any(ch in name for ch in _FORBIDDEN):
        return "contains a path separator or NUL"
    if ".." in name or name.startswith("."):
        return "contains '..' or starts with '.'"
    if not name.isprintable():
        return "contains a non-printable character"
    return None


def check_name(name: object, *, kind: str, source: str) -> str:
    """Return `name` if allowed; otherwise raise `UnsafeNameError` naming `kind` and `source`."""
    problem = name_problem(name)
    if problem is not None:
        raise UnsafeNameError(
            f"{source}: {kind} name {name!r} {problem}; names must be plain, printable and "
            "stay inside the checkpoint directory. The checkpoint is malformed or malicious: "
            "re-convert it from a trusted source."
        )
    assert isinstance(name, str)
    return name
