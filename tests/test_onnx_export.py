"""`moeport export-onnx`: the whole model and each block as ONNX graphs, run in onnxruntime against the eager model."""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
import pytest
import torch

from moeport.cli import main
from moeport.model import load_pretrained
from moeport.model.experts import ExpertFFNs
from moeport.model.export import experts_all_dense
from moeport.model.router import Routing, ffn_slots

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytestmark = pytest.mark.timeout(600)

BLOCK_FILES = ["attention.onnx", "dense_ffn.onnx", "experts.onnx", "router.onnx", "scmoe_layer.onnx"]


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """The tiny reference checkpoint exported with every block, verified by the command: (folder, its stdout)."""
    out = tmp_path_factory.mktemp("onnx")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["export-onnx", "--checkpoint", checkpoint, "--out", str(out / "model.onnx"),
                     "--blocks", str(out / "blocks")])
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_command_verifies_every_graph_in_onnxruntime(exported):
    out, printed = exported
    lines = printed.splitlines()
    assert sorted(p.name for p in (out / "blocks").iterdir()) == BLOCK_FILES
    for name in ("model", "attention", "dense_ffn", "router", "experts", "scmoe_layer"):
        line = next(line for line in lines if line.split()[0] == name)
        difference = float(line.rsplit("max |difference|", 1)[1])
        assert difference <= 1e-4, line
    for path in [out / "model.onnx", *sorted((out / "blocks").iterdir())]:
        onnx.checker.check_model(str(path), full_check=True)


@pytest.mark.parametrize("shape", [(1, 5), (4, 17), (3, 1)])
def test_the_model_graph_matches_the_eager_model_at_other_shapes(exported, checkpoint, shape):
    out, _ = exported
    ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(sum(shape)))
    logits = session(out / "model.onnx").run(["logits"], {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = load_pretrained(checkpoint)(ids)
    assert logits.shape == tuple(want.shape)
    assert np.abs(logits - want.numpy()).max() <= 1e-4


def test_each_block_matches_the_eager_block_with_its_named_inputs(exported, checkpoint):
    from moeport.model.mla import rope_cos_sin

    out, _ = exported
    model = load_pretrained(checkpoint)
    layer, config = model.model.layers[0], model.config
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, config.hidden_size, generator=g)
    rows = x.reshape(-1, config.hidden_size)
    cos, sin = rope_cos_sin(model.rope_inv_freq, torch.arange(9)[None], torch.float32)
    with torch.no_grad():
        routing = layer.mlp.router(rows)
        want = {
            "attention": layer.self_attn[0](x, cos, sin),
            "dense_ffn": layer.mlps[0](x),
            "scmoe_layer": layer(x, cos, sin),
            "experts": layer.mlp.experts(rows, ffn_slots(routing, config.n_routed_experts), routing.weights),
        }
    blocks = out / "blocks"
    for name in ("attention", "dense_ffn", "scmoe_layer"):
        s = session(blocks / f"{name}.onnx")
        assert [i.name for i in s.get_inputs()] == ["hidden_states"]
        got = s.run(None, {"hidden_states": x.numpy()})[0]
        assert np.abs(got - want[name].numpy()).max() <= 1e-4, name
    s = session(blocks / "router.onnx")
    assert [o.name for o in s.get_outputs()] == ["expert_ids", "expert_weights"]
    ids, weights = s.run(None, {"hidden_states": rows.numpy()})
    order, want_order = np.argsort(ids, axis=1), routing.ids.sort(dim=1).indices.numpy()
    assert np.array_equal(np.take_along_axis(ids, order, 1), np.take_along_axis(routing.ids.numpy(), want_order, 1))
    assert np.abs(np.take_along_axis(weights, order, 1) -
                  np.take_along_axis(routing.weights.numpy(), want_order, 1)).max() <= 1e-6
    s = session(blocks / "experts.onnx")
    assert [i.name for i in s.get_inputs()] == ["hidden_states", "expert_ids", "expert_weights"]
    got = s.run(["experts_output"], {"hidden_states": rows.numpy(), "expert_ids": routing.ids.numpy(),
                                     "expert_weights": routing.weights.numpy()})[0]
    assert np.abs(got - want["experts"].numpy()).max() <= 1e-4


def test_the_dense_form_of_the_experts_equals_the_eager_experts():
    """Every expert on every row, gated by the router's weights, is the eager sum over the chosen FFN experts; zero
    experts (ids >= E) add nothing."""
    from moeport.model import PRESETS

    config = PRESETS["tiny"]
    experts = ExpertFFNs(config, range(config.n_routed_experts))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        experts.gate_up.normal_(0, 0.2, generator=g)
        experts.down.normal_(0, 0.2, generator=g)
        x = torch.randn(23, config.hidden_size, generator=g)
        ids = torch.randint(0, config.num_experts_total, (23, config.moe_topk), generator=g)
        weights = torch.rand(23, config.moe_topk, generator=g)
        eager = experts(x, ffn_slots(Routing(ids, weights), config.n_routed_experts), weights)
        dense = experts_all_dense(x, ids, weights, experts.gate_up, experts.down)
    assert (ids >= config.n_routed_experts).any()
    assert (dense - eager).abs().max() <= 1e-5


def test_bfloat16_is_checked_by_onnx_checker_and_says_so(tmp_path, capsys):
    assert main(["export-onnx", "--model", "tiny", "--dtype", "bfloat16", "--out", str(tmp_path / "m.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "onnx.checker only" in printed and "bfloat16" in printed
    assert onnx.load(str(tmp_path / "m.onnx")).graph.input[0].name == "input_ids"


def test_external_data_and_no_verify(tmp_path, capsys, monkeypatch):
    import moeport.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as for a model of more than 1 GiB of weights
    assert main(["export-onnx", "--model", "tiny", "--out", str(tmp_path / "m.onnx"), "--no-verify"]) == 0
    assert "not verified" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # nothing left over
    ids = torch.randint(0, 256, (2, 6))
    got = session(tmp_path / "m.onnx").run(None, {"input_ids": ids.numpy()})[0]
    assert got.shape == (2, 6, 256)


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--out", "x.txt"], "expected a file name ending in .onnx"),
    (["--model", "nosuch", "--out", "x.onnx"], "nosuch"),
    (["--checkpoint", "/nonexistent", "--out", "x.onnx"], "no such directory"),
    (["--model", "tiny", "--out", "x.onnx", "--opset", "11"], "opset"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, message, capsys):
    assert main(["export-onnx", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_without_the_onnx_extra_the_command_names_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert main(["export-onnx", "--model", "tiny", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'moeport[onnx]'" in capsys.readouterr().err
