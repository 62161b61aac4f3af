"""Profiles: every shipped profile loads; every user mistake is one line, exit 2, with the key path."""

from __future__ import annotations

import textwrap

import pytest

from conftest import assert_user_error, run_cli
from moeport.base.errors import UserError
from moeport.cli import main
from moeport.profile import load_profile, shipped_profiles

SHIPPED = ["cpu-gloo", "generic-cpu", "cpu-mpi", "cuda-nccl", "rocm-rccl", "xpu-xccl", "npu-hccl", "emulated-link"]


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(capsys, *args: str) -> _Result:
    """The CLI in this process (fast), with its exit code and output."""
    code = main(list(args))
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)


def test_every_profile_ships():
    assert set(SHIPPED) <= set(shipped_profiles())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_validate(name):
    profile = load_profile(name)
    assert profile.source.endswith(f"{name}.yaml")
    assert profile.ep * profile.dp == profile.world_size


def test_defaults_and_world_size_override():
    profile = load_profile(None, world_size=4)
    assert profile.source.endswith("cpu-gloo.yaml")
    assert (profile.world_size, profile.ep, profile.dp) == (4, 4, 1)


def test_ep_splits_world_into_dp(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("parallel: {world_size: 4, ep: 2}\n")
    profile = load_profile(str(path))
    assert (profile.ep, profile.dp) == (2, 2)


def test_relative_checkpoint_resolves_against_profile_dir(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: {checkpoint: ckpt}\n")
    assert load_profile(str(path)).model.checkpoint == str(tmp_path / "ckpt")


def test_replace_keeps_source_and_validates():
    profile = load_profile("cpu-gloo").replace(**{"collectives.timeout_s": 5.0})
    assert profile.collectives.timeout_s == 5.0 and profile.source.endswith("cpu-gloo.yaml")
    with pytest.raises(UserError, match="collectives.timeout_s"):
        profile.replace(**{"collectives.timeout_s": -1.0})


# (yaml text, extra CLI args, substrings the one error line must contain)
USER_ERRORS = {
    "malformed yaml": ("backend: [cpu\n", [], ["malformed YAML", "line"]),
    "not a mapping": ("- cpu\n", [], ["expected a mapping"]),
    "unknown top key": ("backnd: cpu\n", [], ["backnd", "unknown key"]),
    "unknown nested key": ("parallel: {world_size: 2, eps: 2}\n", [], ["parallel.eps", "unknown key"]),
    "wrong type": ("parallel: {world_size: two}\n", [], ["parallel.world_size", "integer", "'two'"]),
    "string for int": ("parallel: {world_size: '2'}\n", [], ["parallel.world_size", "integer"]),
    "zero world size": ("parallel: {world_size: 0}\n", [], ["parallel.world_size", "greater than or equal to 1"]),
    "negative timeout": ("collectives: {timeout_s: -1}\n", [], ["collectives.timeout_s", "greater than 0"]),
    "unknown dtype": ("dtype: float64\n", [], ["dtype", "float32", "float64"]),
    "unknown schedule": ("schedule: fastest\n", [], ["schedule", "overlap", "sequential"]),
    "unknown library": ("collectives: {library: shmem}\n", [], ["collectives.library", "torch", "mpi"]),
    "tp reserved": ("parallel: {world_size: 2, tp: 2}\n", [], ["parallel.tp", "1"]),
    "ep does not divide world": ("parallel: {world_size: 4, ep: 3}\n", [], ["parallel.ep", "3", "4"]),
    "ep vs --world-size": ("parallel: {world_size: 4, ep: 2}\n", ["--world-size", "3"], ["parallel.ep", "2", "3", "--world-size"]),
    "ep larger than experts": ("parallel: {world_size: 16}\n", [], ["parallel.ep", "16", "8 FFN experts"]),
    "ep does not divide experts": ("parallel: {world_size: 3}\n", [], ["parallel.ep", "3", "8 FFN experts"]),
    "unknown preset": ("model: {preset: huge}\n", [], ["model.preset", "huge", "tiny"]),
    "unknown dispatch": ("moe: {dispatch: fastest}\n", [], ["moe.dispatch", "fastest", "low_latency"]),
    "no room": ("moe: {max_tokens_per_rank: 0}\n", [], ["moe.max_tokens_per_rank", "greater than or equal to 1"]),
    "preset and checkpoint": ("model: {preset: tiny, checkpoint: x}\n", [], ["model", "not both"]),
    "missing checkpoint dir": ("model: {checkpoint: /nonexistent/ckpt}\n", [], ["model.checkpoint", "/nonexistent/ckpt"]),
    "emulated link bandwidth": ("emulated_link: {latency_us: 1, bandwidth_gbps: 0}\n", [], ["emulated_link.bandwidth_gbps"]),
    "emulated link missing key": ("emulated_link: {latency_us: 1}\n", [], ["emulated_link.bandwidth_gbps", "missing"]),
    "unknown backend": ("backend: quantum\n", [], ["backend", "quantum", "available", "cpu", "generic"]),
    "bad class path": ("backend: 'nosuchpkg.mod:Thing'\n", [], ["backend", "nosuchpkg.mod:Thing", "ModuleNotFoundError"]),
    "class not a backend": ("backend: 'collections:OrderedDict'\n", [], ["backend", "not a subclass"]),
    "absent hardware": ("backend: cuda\n", [], ["backend", "no CUDA device"]),
    "absent generic device": ("backend: generic\ndevice_type: xpu\n", [], ["backend", "no 'xpu' device"]),
    "negative world size flag": ("{}\n", ["--world-size", "0"], ["--world-size", "positive"]),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_are_one_line_exit_2(case, tmp_path, capsys):
    text, extra, needles = USER_ERRORS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    result = run_main(capsys, "info", "--profile", str(path), *extra)
    line = assert_user_error(result, *needles)
    if case not in ("negative world size flag",):
        assert str(path) in line


def test_missing_profile_names_it(capsys):
    assert_user_error(run_main(capsys, "info", "--profile", "no-such-profile"), "no-such-profile", "cpu-gloo")
    assert_user_error(run_main(capsys, "info", "--profile", "/tmp/nope/x.yaml"), "/tmp/nope/x.yaml", "no such file")


def test_user_error_in_a_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("parallel: {world_size: 4, ep: 3}\n")
    assert_user_error(run_cli("info", "--profile", str(path)), "parallel.ep")


def test_a_decode_batch_beyond_the_low_latency_room_is_a_user_error(tmp_path):
    path = tmp_path / "room.yaml"
    path.write_text("parallel: {world_size: 2}\nmoe: {max_tokens_per_rank: 4}\n")
    assert_user_error(run_cli("run", "--profile", str(path), "--batch", "8", "--iterations", "1"),
                      str(path), "moe.max_tokens_per_rank", "4", "8 tokens per rank of a decoding step")
    path.write_text("parallel: {world_size: 2}\nmoe: {dispatch: low_latency, max_tokens_per_rank: 16}\n")
    assert_user_error(run_cli("run", "--profile", str(path), "--batch", "2", "--prompt-length", "9", "--iterations", "1"),
                      "moe.max_tokens_per_rank", "18 tokens per rank of the prefill")
    path.write_text("parallel: {world_size: 2}\nmoe: {dispatch: normal, max_tokens_per_rank: 4}\n")
    assert run_cli("run", "--profile", str(path), "--batch", "8", "--iterations", "1").returncode == 0  # no room needed
