"""`lstmd keys generate|reload`: CurveZMQ key pairs, and making a running daemon re-read its key directories."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from lstmd.clients.cli._common import ConfigOpt, ControlOpt, admin_or_exit, call_or_exit, console, fail

app = typer.Typer(help="CurveZMQ keys for \\[security]: generate key pairs, reload the daemon's key directories.")


@app.command()
def generate(
    directory: Annotated[Path, typer.Argument(help="Where to write the key files (created if missing).")],
    name: Annotated[str, typer.Option("--name", help="Base name: writes NAME.key and NAME.key_secret.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing key files of that name.")] = False,
) -> None:
    """Write a key pair as ZeroMQ certificate files: DIR/NAME.key (public) and DIR/NAME.key_secret (secret, 0600)."""
    import zmq.auth

    if not name or Path(name).name != name or name.startswith("."):
        raise fail(f"--name must be a plain file name (no directories, not hidden), got {name!r}")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not force:
        raise fail(f"{' and '.join(existing)} already exist: choose another --name, or --force to replace them")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # pyzmq writes with the process umask: create both files private, then open up the public one, so the
        # secret key is never readable by others, not even for a moment.
        umask = os.umask(0o077)
        try:
            zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(umask)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
    except OSError as exc:
        raise fail(f"cannot write keys into {directory}: {exc.strerror or exc}") from None
    console.print(f"public key: {public}\nsecret key: {secret} (mode 0600: keep it on this machine only)")


@app.command()
def reload(config: ConfigOpt = None, control: ControlOpt = None) -> None:
    """Make the running daemon re-read its producer and admin key directories (as SIGHUP does); needs an admin key."""
    counts = call_or_exit(admin_or_exit(config, control).reload_keys)
    console.print(f"keys reloaded: {counts['producer_keys']} producer, {counts['admin_keys']} admin")
