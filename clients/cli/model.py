"""`lstmd model info|export|import|convert|versions|rollback`: the serving weights, their history, and Keras / ONNX."""

from __future__ import annotations

import base64
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from lstmd.clients.cli._common import (
    ConfigOpt,
    ControlOpt,
    JsonOpt,
    TimeoutOpt,
    admin_or_exit,
    call_or_exit,
    console,
    fail,
    print_json,
    rows_table,
)
from lstmd.clients.cli._format import model_view

app = typer.Typer(help="Inspect, export and import the serving model.", no_args_is_help=True)


@app.command()
def info(
    config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0, json: JsonOpt = False
) -> None:
    """Show the serving model's sizes, task and version."""
    data = call_or_exit(admin_or_exit(config, control, timeout).model_info)
    if json:
        print_json(data)
    else:
        console.print(model_view(data))


class ExportFormat(StrEnum):
    safetensors = "safetensors"
    onnx = "onnx"


@app.command("export")
def export(
    path: Annotated[Path, typer.Argument(help="Where to write the model file.")],
    format: Annotated[
        ExportFormat, typer.Option("--format", help="safetensors (lstmd's model file) or onnx (state as inputs).")
    ] = ExportFormat.safetensors,
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
) -> None:
    """Write the serving model to a safetensors file, or an ONNX graph with the LSTM state as inputs/outputs."""
    if not path.parent.is_dir():
        raise fail(f"cannot write {path}: the folder {path.parent} does not exist")
    admin = admin_or_exit(config, control, timeout)
    try:
        if format is ExportFormat.safetensors:
            result = call_or_exit(admin.export_model, path)
        else:
            result = call_or_exit(admin.call, "export_model")
            _write_onnx(base64.b64decode(result["safetensors_b64"]), path)
    except OSError as exc:
        raise fail(f"cannot write {path}: {exc.strerror or exc}") from None
    console.print(f"exported model version {result['version']} to {path} ({format.value})")


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="A safetensors model file, or a Keras .keras / .h5 model.")],
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
) -> None:
    """Serve a model file from the next batch on (Keras files are converted by the daemon, or refused)."""
    if not path.is_file():
        raise fail(f"{path} is not a file")
    if path.suffix.lower() not in (".keras", ".h5"):  # Keras files are converted (DESIGN.md); the rest must be
        from lstmd.daemon.config import ConfigError, model_file_metadata

        try:
            model_file_metadata(path)  # the header alone: a CSV or a torch .pt is named as such, not sent
        except ConfigError as exc:
            raise fail(str(exc)) from None
    result = call_or_exit(admin_or_exit(config, control, timeout).import_model, path)
    console.print(f"serving {path} as model version {result['version']}")


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="A Keras model: .keras (Keras 3) or legacy .h5.")],
    target: Annotated[Path, typer.Argument(help="The lstmd model file to write (.safetensors; .onnx for ONNX).")],
) -> None:
    """Convert a Keras LSTM model into an lstmd model file offline, exactly, or say why it cannot be."""
    from lstmd.daemon.keras_import import KerasImportError, convert_keras

    try:
        data = source.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {source}: {exc.strerror}") from None
    try:
        model = convert_keras(data)
    except KerasImportError as exc:
        raise fail(f"cannot convert {source}: {exc}") from None
    try:
        if target.suffix == ".onnx":
            _write_onnx(model.to_bytes(), target)
        else:
            target.write_bytes(model.to_bytes())
    except OSError as exc:
        raise fail(f"cannot write {target}: {exc.strerror or exc}") from None
    s = model.spec
    console.print(
        f"wrote {target}: {s.num_layers} LSTM layer(s) of {s.hidden_size}, input_size {s.input_size}, "
        f"{s.task} with output_size {s.output_size} (serve it with these [model] settings)"
    )


def _write_onnx(safetensors_bytes: bytes, path: Path) -> None:
    from lstmd.daemon.model import ServingModel
    from lstmd.daemon.onnx_export import OnnxExportError, to_onnx

    try:
        path.write_bytes(to_onnx(ServingModel.from_bytes(safetensors_bytes)))
    except OnnxExportError as exc:
        raise fail(f"cannot export to ONNX: {exc}") from None


@app.command()
def versions(
    config: ConfigOpt = None, control: ControlOpt = None, timeout: TimeoutOpt = 3.0, json: JsonOpt = False
) -> None:
    """List the kept model versions, newest first."""
    data = call_or_exit(admin_or_exit(config, control, timeout).model_versions)
    if json:
        print_json(data)
        return
    rows = [
        {
            "version": d["version"],
            "serving": "*" if d["serving"] else "",
            "source": d["source"],
            "published": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["published"])),
            "holdout loss": "-" if d.get("holdout_loss") is None else f"{d['holdout_loss']:.4g}",
        }
        for d in data
    ]
    console.print(rows_table("model versions", rows))


@app.command()
def rollback(
    version: Annotated[
        int | None, typer.Argument(help="Version whose weights to serve again; default: the one before.")
    ] = None,
    config: ConfigOpt = None,
    control: ControlOpt = None,
    timeout: TimeoutOpt = 3.0,
) -> None:
    """Serve an earlier version's weights again, exactly, as a new version number."""
    result = call_or_exit(admin_or_exit(config, control, timeout).rollback, version)
    console.print(f"serving the weights of version {result['weights_of']} as version {result['version']}")
