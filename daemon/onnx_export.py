"""The serving model as an ONNX graph whose LSTM state is explicit inputs and outputs, so another runtime can
continue a stream from the state lstmd held (`lstmd streams show ID --state-out FILE`).

Built with onnx.helper from the weights (no tracing, no TorchScript; opset 17, ONNX's own `LSTM` op per layer):

    inputs   x  [B, T, I] float32    events, batch first (T = 1 for one step)
             h0 [L, B, H] float32    each layer's hidden state (a stream's exported `h` [L, H] is h0[:, b])
             c0 [L, B, H] float32    each layer's cell state
    outputs  y  [B, T, O] float32    the daemon's reply to every event: head(h_t), its softmax for classification
             hn [L, B, H], cn [L, B, H]   the state after the last event, for the next call

ONNX's LSTM orders the gates (i, o, f, c) where nn.LSTM has (i, f, g, o), and carries both biases in one
[8H] vector; the rows are reordered here, nothing else changes.

Forecast models with normalisation statistics (daemon/normalization.py) take one more input, `x_prev` [B, I]:
each stream's event before x[:, 0] (a stream's exported `x_prev`; NaN where it is not known, e.g. a stream's
first event or one after a reset, whose change then counts as 0, as in the daemon). The graph forms the changes,
scales them as the metadata says, and answers last value + scaled predicted change of the forecast columns, as
the daemon does; the next call's `x_prev` is x[:, -1].
"""

from __future__ import annotations

import numpy as np
from lstmd.daemon.model import ServingModel

OPSET = 17


class OnnxExportError(ValueError):
    """The model cannot be exported; the message says why."""


def to_onnx(model: ServingModel) -> bytes:
    """The serialised ONNX model (see the module docstring for its inputs and outputs)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise OnnxExportError("exporting to ONNX needs the onnx package, which is not installed: "
                              "pip install 'lstmd[onnx]'") from None
    spec, norm = model.spec, model.normalization
    H, L = spec.hidden_size, spec.num_layers
    t = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.tensors.items()}
    # nn.LSTM rows (i, f, g, o) -> ONNX rows (i, o, f, c)
    order = np.concatenate([np.arange(0, H), np.arange(3 * H, 4 * H), np.arange(H, 2 * H), np.arange(2 * H, 3 * H)])
    initializers, nodes = [], []

    def const(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d scalars
        return name

    if norm is not None and norm.inputs == "stream":
        raise OnnxExportError(
            "this forecast model scales each stream by its own running scale and shrinks its forecasts per stream "
            "(forecast_normalization inputs = \"stream\"): that per-stream state is not part of an ONNX graph; "
            "train with --set train.forecast_inputs=change to export"
        )
    lstm_input = "x"
    if norm is not None:  # forecast: what daemon/engine.py feeds the LSTM (ForecastNormalization.lstm_inputs)
        stats = {k: getattr(norm, k).detach().cpu().numpy().astype(np.float32) for k in ("mean", "std", "delta_scale")}
        if norm.inputs == "change":
            nodes += [
                helper.make_node("Gather", ["x", const("first", np.array(0, np.int64))], ["x_first"], axis=1),
                helper.make_node("IsNaN", ["x_prev"], ["prev_unknown"]),  # unknown: the change counts as 0
                helper.make_node("Where", ["prev_unknown", "x_first", "x_prev"], ["prev_known"]),
                helper.make_node("Unsqueeze", ["prev_known", const("axis1", np.array([1], np.int64))], ["prev_1"]),
                helper.make_node(
                    "Slice", ["x", const("zero", np.array([0], np.int64)), const("minus1", np.array([-1], np.int64)),
                              "axis1"], ["x_but_last"],
                ),
                helper.make_node("Concat", ["prev_1", "x_but_last"], ["previous"], axis=1),
                helper.make_node("Sub", ["x", "previous"], ["change"]),
                helper.make_node("Div", ["change", const("delta_scale", stats["delta_scale"])], ["lstm_in"]),
            ]
        else:
            nodes += [
                helper.make_node("Sub", ["x", const("mean", stats["mean"])], ["centred"]),
                helper.make_node("Div", ["centred", const("std", stats["std"])], ["lstm_in"]),
            ]
        lstm_input = "lstm_in"
    nodes.append(helper.make_node("Transpose", [lstm_input], ["x_tbi"], perm=[1, 0, 2]))  # ONNX LSTM is time-major
    const("squeeze_axes", np.array([1], np.int64))
    layer_input, hs, cs = "x_tbi", [], []
    for k in range(L):
        w = const(f"W_l{k}", t[f"weight_ih_l{k}"][order][None])
        r = const(f"R_l{k}", t[f"weight_hh_l{k}"][order][None])
        b = const(f"B_l{k}", np.concatenate([t[f"bias_ih_l{k}"][order], t[f"bias_hh_l{k}"][order]])[None])
        starts, ends = const(f"start_l{k}", np.array([k], np.int64)), const(f"end_l{k}", np.array([k + 1], np.int64))
        axes = const(f"axis0_l{k}", np.array([0], np.int64))
        nodes += [
            helper.make_node("Slice", ["h0", starts, ends, axes], [f"h0_l{k}"]),
            helper.make_node("Slice", ["c0", starts, ends, axes], [f"c0_l{k}"]),
            helper.make_node(
                "LSTM", [layer_input, w, r, b, "", f"h0_l{k}", f"c0_l{k}"], [f"y_l{k}", f"hn_l{k}", f"cn_l{k}"],
                hidden_size=H,
            ),
            helper.make_node("Squeeze", [f"y_l{k}", "squeeze_axes"], [f"seq_l{k}"]),  # [T, 1, B, H] -> [T, B, H]
        ]
        layer_input = f"seq_l{k}"
        hs.append(f"hn_l{k}")
        cs.append(f"cn_l{k}")
    # the head's output is the reply itself, or the logits / predicted change it is computed from
    head_out = "logits" if spec.task == "classification" else "predicted_change" if norm is not None else "y"
    nodes += [
        helper.make_node("Concat", hs, ["hn"], axis=0),
        helper.make_node("Concat", cs, ["cn"], axis=0),
        helper.make_node("Transpose", [layer_input], ["seq_bth"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["seq_bth", const("head_weight_t", t["head.weight"].T)], ["head_mm"]),
        helper.make_node("Add", ["head_mm", const("head_bias", t["head.bias"])], [head_out]),
    ]
    if spec.task == "classification":  # the daemon replies with class probabilities (daemon/engine.py)
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], axis=-1))
    if head_out == "predicted_change":  # ForecastNormalization.predictions: last value + scaled predicted change
        columns = np.array(spec.target_columns, np.int64)
        nodes += [
            helper.make_node("Gather", ["x", const("columns", columns)], ["last_value"], axis=2),
            helper.make_node("Mul", ["predicted_change", const("target_scale", stats["delta_scale"][columns])],
                             ["scaled_change"]),
            helper.make_node("Add", ["last_value", "scaled_change"], ["y"]),
        ]

    def value(name: str, *dims) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))

    graph = helper.make_graph(
        nodes,
        "lstmd",
        [
            value("x", "B", "T", spec.input_size), value("h0", L, "B", H), value("c0", L, "B", H),
            *([value("x_prev", "B", spec.input_size)] if norm is not None and norm.inputs == "change" else []),
        ],
        [value("y", "B", "T", spec.output_size), value("hn", L, "B", H), value("cn", L, "B", H)],
        initializers,
    )
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lstmd", doc_string=__doc__
    )
    helper.set_model_props(
        onnx_model,
        {**spec.to_metadata(), "version": str(model.version), "state": "h0/c0 [L, B, H] in, hn/cn out"},
    )
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model.SerializeToString()
