"""Checkpoints that cannot be read are one-line user errors; files moeport writes follow the umask, and a write that
fails is one line naming the file and the cause, keeping the earlier file and leaving no temporary file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from moeport.base.atomic import atomic_path, write_text
from moeport.base.errors import UserError, WriteError
from moeport.launch import RankFailure, spawn
from moeport.model import LongcatForCausalLM, load_pretrained, save_pretrained
from moeport.model.checkpoint import INDEX_FILE, SINGLE_FILE, load_weights
from moeport.model.config import LongcatConfig
from moeport.model.context import ModelContext

pytestmark = pytest.mark.timeout(300)

SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---- helpers -----------------------------------------------------------------------------------------------------


def _copy_with(checkpoint: str, dst, edit) -> str:
    """A copy of checkpoint `checkpoint` at `dst`, after `edit(dst)` has changed its files."""
    shutil.copytree(checkpoint, dst)
    edit(str(dst))
    return str(dst)


def _cut(file: str, keep: int) -> None:
    """Truncate `file` to its first `keep` bytes (negative: drop the last -keep)."""
    path = Path(file)
    path.write_bytes(path.read_bytes()[:keep])


def _sharded(checkpoint: str, dst) -> str:
    """A two-shard copy of `checkpoint`, written as two expert-parallel ranks write it (save_pretrained per rank).

    Each rank's model is built with an expert-parallel group that only tells its rank and size:
    building the model and loading its share of the checkpoint need nothing more of it.
    """
    config = LongcatConfig.from_file(checkpoint)
    for rank in range(2):
        model = LongcatForCausalLM(config, ModelContext(SimpleNamespace(rank=rank, world_size=2)))
        load_weights(model, checkpoint)
        save_pretrained(model, str(dst), rank=rank, world_size=2)
    assert sorted(os.listdir(dst)) == ["config.json", SHARD_1, SHARD_2, INDEX_FILE]
    return str(dst)


def _index_moves(name: str, to: str):
    """An edit of a sharded checkpoint whose index places tensor `name` in file `to`."""
    def edit(path: str) -> None:
        index_path = Path(path, INDEX_FILE)
        index = json.loads(index_path.read_text())
        index["weight_map"][name] = to
        index_path.write_text(json.dumps(index))
    return edit


def _moeport(*args: str, umask: int | None = None, file_size: int | None = None, timeout: float = 120):
    """Run `python -m moeport ARGS` with the given umask and RLIMIT_FSIZE (bytes) in the new process."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    return subprocess.run(
        [sys.executable, "-m", "moeport", *args], check=False, capture_output=True, text=True, timeout=timeout,
        umask=-1 if umask is None else umask, preexec_fn=None if file_size is None else limit,
    )


@contextlib.contextmanager
def _umask(mask: int):
    """This process's umask set to `mask` for the block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def _file_size_limit(size: int):
    """RLIMIT_FSIZE (soft) set to `size` bytes for the block in this process (CPython ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def _temporaries(folder) -> list[str]:
    """Files a write may leave behind in `folder`: ours (.NAME.RANDOM.tmp) and safetensors' own (.tmpXXXXXX)."""
    return [name for name in os.listdir(folder) if name.startswith(".")]


def _one_line_write_error(result, path: str, cause: str) -> None:
    """Exit code 1 and exactly the line `moeport: error: cannot write PATH: CAUSE` on stderr."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.strip().splitlines() == [f"moeport: error: cannot write {path}: {cause}"], result.stderr


def _forward(checkpoint: str, tokens: str, out: str, *extra: str):
    return run_cli("forward", "--checkpoint", checkpoint, "--tokens", tokens, "--out", out, *extra)


# ---- checkpoints that cannot be read ------------------------------------------------------------------------------


def test_truncated_checkpoint_is_a_one_line_user_error(checkpoint, tokens, tmp_path):
    """Cut in the middle of a tensor's data: safetensors' own "Error while deserializing header" never shows."""
    path = _copy_with(checkpoint, tmp_path / "truncated", lambda p: _cut(os.path.join(p, SINGLE_FILE), 600_000))
    file = os.path.join(path, SINGLE_FILE)
    with pytest.raises(UserError, match=r"model\.safetensors: not a valid safetensors file: truncated \(600000 bytes"):
        load_pretrained(path)
    line = assert_user_error(_forward(path, tokens, str(tmp_path / "o.npy")), file, "truncated (600000 bytes")
    assert "SafetensorError" not in line and "deserializing" not in line and "rank" not in line


def test_corrupt_header_is_a_one_line_user_error(checkpoint, tokens, tmp_path):
    def scramble(p: str) -> None:
        file = Path(p, SINGLE_FILE)
        data = bytearray(file.read_bytes())
        data[8:40] = b"#" * 32  # the start of the JSON header
        file.write_bytes(bytes(data))

    path = _copy_with(checkpoint, tmp_path / "corrupt", scramble)
    file = os.path.join(path, SINGLE_FILE)
    with pytest.raises(UserError, match="corrupt header"):
        load_pretrained(path)
    assert_user_error(_forward(path, tokens, str(tmp_path / "o.npy"), "--world-size", "1"), file, "corrupt header")


def test_missing_shard_is_a_one_line_user_error(checkpoint, tokens, tmp_path):
    sharded = _sharded(checkpoint, tmp_path / "sharded")
    load_pretrained(sharded)  # whole, it loads
    path = _copy_with(sharded, tmp_path / "missing", lambda p: os.remove(os.path.join(p, SHARD_2)))
    file = os.path.join(path, SHARD_2)
    with pytest.raises(UserError, match=f"{SHARD_2}: no such file, though {INDEX_FILE} places"):
        load_pretrained(path)
    assert_user_error(_forward(path, tokens, str(tmp_path / "o.npy"), "--world-size", "1"), file, "no such file")


def test_index_naming_a_file_without_the_tensor_is_a_one_line_user_error(checkpoint, tokens, tmp_path):
    sharded = _sharded(checkpoint, tmp_path / "sharded")
    path = _copy_with(sharded, tmp_path / "misplaced", _index_moves("model.norm.weight", SHARD_2))
    file = os.path.join(path, SHARD_2)
    with pytest.raises(UserError, match=f"{SHARD_2}: no tensor model.norm.weight, though {INDEX_FILE} places it"):
        load_pretrained(path)
    assert_user_error(_forward(path, tokens, str(tmp_path / "o.npy"), "--world-size", "1"),
                      file, "no tensor model.norm.weight")


def test_truncated_shard_and_bad_weight_map_are_user_errors(checkpoint, tmp_path):
    sharded = _sharded(checkpoint, tmp_path / "sharded")
    cut = _copy_with(sharded, tmp_path / "cut", lambda p: _cut(os.path.join(p, SHARD_2), -100))
    with pytest.raises(UserError, match=f"{SHARD_2}: not a valid safetensors file: truncated"):
        load_pretrained(cut)

    def list_map(p: str) -> None:
        Path(p, INDEX_FILE).write_text(json.dumps({"weight_map": [SHARD_1]}))

    with pytest.raises(UserError, match=f"{INDEX_FILE}: not a valid safetensors index"):
        load_pretrained(_copy_with(sharded, tmp_path / "list", list_map))


# ---- the mode of what moeport writes --------------------------------------------------------------------------------


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def test_written_files_follow_the_umask(checkpoint, tmp_path, mask, mode):
    """Like open(path, "w"): safetensors' own 0600 temporary file and an earlier file's mode do not count."""
    earlier = tmp_path / "earlier.json"
    earlier.write_text("{}")
    os.chmod(earlier, 0o640)
    with _umask(mask):
        write_text(str(earlier), "{}")
        with atomic_path(str(tmp_path / "new" / "data.bin")) as tmp:
            Path(tmp).write_bytes(b"x")
        save_pretrained(load_pretrained(checkpoint), str(tmp_path / "saved"))
        _sharded(checkpoint, tmp_path / "sharded")
    assert _mode(earlier) == mode and _mode(tmp_path / "new" / "data.bin") == mode
    for folder in ("saved", "sharded"):
        for name in os.listdir(tmp_path / folder):
            assert _mode(tmp_path / folder / name) == mode, (folder, name)


def test_trace_files_follow_the_umask(tmp_path):
    pytest.importorskip("matplotlib")
    from moeport.report import write_traces

    spans = [{"track": "compute", "name": "attention", "layer": 0, "start_ms": 0.0, "end_ms": 1.0, "exposed_ms": 0.0}]
    with _umask(0o022):
        written = write_traces(str(tmp_path / "traces"), [{"rank": 0, "spans": spans}], "t")
    assert [os.path.basename(p) for p in written] == ["trace-rank0.json", "timeline.png"]
    assert [_mode(p) for p in written] == [0o644, 0o644]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def test_cli_output_follows_the_umask(checkpoint, tokens, tmp_path, mask, mode):
    out = str(tmp_path / "logits.npy")
    result = _moeport("forward", "--checkpoint", checkpoint, "--tokens", tokens, "--out", out, "--world-size", "1",
                      umask=mask)
    assert result.returncode == 0, result.stderr
    assert _mode(out) == mode


# ---- writes that fail ---------------------------------------------------------------------------------------------


def test_cli_write_past_the_file_size_limit_is_one_line_and_keeps_the_earlier_file(checkpoint, tokens, tmp_path):
    """Logits are 33,920 bytes; the limit leaves room for everything else the run writes."""
    out = str(tmp_path / "out" / "logits.npy")
    first = _moeport("forward", "--checkpoint", checkpoint, "--tokens", tokens, "--out", out)
    assert first.returncode == 0, first.stderr
    earlier = Path(out).read_bytes()
    assert len(earlier) > 20_000
    result = _moeport("forward", "--checkpoint", checkpoint, "--tokens", tokens, "--out", out, file_size=20_000)
    _one_line_write_error(result, out, "File too large")
    assert "Traceback" not in result.stderr and "requested" not in result.stderr
    assert Path(out).read_bytes() == earlier
    assert _temporaries(tmp_path / "out") == []


def test_save_pretrained_past_the_file_size_limit_keeps_the_earlier_checkpoint(checkpoint, tmp_path):
    model = load_pretrained(checkpoint)
    target = str(tmp_path / "saved")
    save_pretrained(model, target)
    file = os.path.join(target, SINGLE_FILE)
    earlier = Path(file).read_bytes()
    with _file_size_limit(len(earlier) // 2), pytest.raises(WriteError) as caught:
        save_pretrained(model, target)
    assert str(caught.value) == f"cannot write {file}: File too large"
    assert isinstance(caught.value, OSError) and caught.value.errno == 27  # EFBIG
    assert Path(file).read_bytes() == earlier
    assert _temporaries(target) == [] and sorted(os.listdir(target)) == ["config.json", SINGLE_FILE]
    load_pretrained(target)


def test_trace_png_past_the_file_size_limit_is_a_write_error(tmp_path):
    pytest.importorskip("matplotlib")
    from moeport.report import write_traces

    spans = [{"track": t, "name": "x", "layer": 0, "start_ms": 0.0, "end_ms": 1.0, "exposed_ms": 0.0}
             for t in ("compute", "comm")]
    folder = tmp_path / "traces"
    folder.mkdir()
    with _file_size_limit(4096), pytest.raises(WriteError) as caught:  # the JSON fits, the PNG does not
        write_traces(str(folder), [{"rank": 0, "spans": spans}], "t")
    assert str(caught.value) == f"cannot write {folder / 'timeline.png'}: File too large"
    assert sorted(os.listdir(folder)) == ["trace-rank0.json"]


def test_cli_output_under_a_file_is_one_line_naming_it(checkpoint, tokens, tmp_path):
    """A folder that cannot be made (a file is in the way): exit 1, one line; root cannot get round this one."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = str(blocker / "logits.npy")
    result = _forward(checkpoint, tokens, out, "--world-size", "1")
    _one_line_write_error(result, out, f"{blocker} is not a folder")
    assert blocker.read_text() == "not a folder"


def test_atomic_path_failures_name_the_file_and_the_cause(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for path, cause in [(blocker / "deeper" / "f.json", f"{blocker} is not a folder"),
                        (tmp_path, "Is a directory")]:
        with pytest.raises(WriteError) as caught:
            write_text(str(path), "{}")
        assert str(caught.value) == f"cannot write {path}: {cause}"
    assert _temporaries(tmp_path) == []


@pytest.mark.skipif(IS_ROOT, reason="root ignores permissions (the rlimit tests cover the same code path)")
def test_permission_denied_folder_is_one_line_and_keeps_the_earlier_file(checkpoint, tokens, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    out = str(folder / "logits.npy")
    Path(out).write_bytes(b"earlier")
    os.chmod(folder, 0o500)
    try:
        result = _forward(checkpoint, tokens, out, "--world-size", "1")
        _one_line_write_error(result, out, "Permission denied")
        assert Path(out).read_bytes() == b"earlier"
    finally:
        os.chmod(folder, 0o700)


def test_permission_denied_is_a_write_error_even_as_root(tmp_path, monkeypatch):
    """What a folder without write permission does to a non-root user: creating the temporary file fails."""
    folder = tmp_path / "locked"
    folder.mkdir()
    target = folder / "report.json"
    target.write_text("earlier")
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(folder) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(WriteError) as caught:
        write_text(str(target), "{}")
    assert str(caught.value) == f"cannot write {target}: Permission denied"
    assert target.read_text() == "earlier" and _temporaries(folder) == []


def _write_in_a_rank(path: str) -> None:
    write_text(path, "{}")


def test_write_error_in_a_rank_is_its_own_message_and_exit_1(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    path = str(blocker / "report.json")
    with pytest.raises(RankFailure) as caught:
        spawn(_write_in_a_rank, (path,), 1, timeout_s=120)
    assert str(caught.value) == f"rank 0 failed: cannot write {path}: {blocker} is not a folder"
    assert not caught.value.user_error  # the CLI exits 1


def test_npy_written_whole(tmp_path):
    """The CLI's .npy writer (numpy through write() alone) writes what np.load reads back."""
    from moeport.token_files import save_npy as _save_npy

    array = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)
    _save_npy(str(tmp_path / "a.npy"), array)
    _save_npy(str(tmp_path / "f.npy"), np.asfortranarray(array))
    assert np.array_equal(np.load(tmp_path / "a.npy"), array) and np.array_equal(np.load(tmp_path / "f.npy"), array)
