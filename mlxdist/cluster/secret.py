"""The shared cluster secret: 32 random bytes, hex, in a 0600 file."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from mlxdist.errors import UserError

DEFAULT_SECRET_FILE = Path.home() / ".config" / "mlxdist" / "secret"


def load_secret(path: Path | None = None, *, create: bool = True) -> tuple[bytes, bool]:
    """Return (secret, created). Creates the default file on first use (0600) when
    `create`; an explicit --secret-file must already exist, or is created the same way."""
    path = Path(path) if path is not None else DEFAULT_SECRET_FILE
    if path.exists():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UserError(f"secret file {path} is readable by others; run: chmod 600 {path}")
        text = path.read_text().strip()
        if len(text) < 32:
            raise UserError(f"secret file {path} is too short (want at least 32 characters)")
        return text.encode(), False
    if not create:
        raise UserError(f"no cluster secret at {path}; copy it from the first node")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = secrets.token_hex(32)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
    return text.encode(), True
