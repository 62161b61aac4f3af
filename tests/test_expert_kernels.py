"""Devices' expert kernels: the lookup that checks them, MKL's grouped matmul and the fused CPU experts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moeport.backends import cpu_fused_experts, expert_kernels, mkl_grouped_matmul


def _per_group(a, b, sizes):
    return torch.cat([rows @ b[g] for g, rows in enumerate(a.split(sizes))])


def _slot_by_slot(x, ids, weights, gate_up, down):
    want = torch.zeros_like(x)
    for row, slot in (ids >= 0).nonzero().tolist():
        gate, up = (x[row] @ gate_up[ids[row, slot]]).chunk(2)
        want[row] += (F.silu(gate) * up * weights[row, slot]) @ down[ids[row, slot]]
    return want


@pytest.fixture
def mkl():
    kernel = mkl_grouped_matmul.grouped_matmul()
    if kernel is None:
        pytest.skip("this torch build carries no MKL batch GEMM")
    return kernel


@pytest.fixture
def fused():
    kernel = cpu_fused_experts.fused_experts()
    if kernel is None:
        pytest.skip("no MKL in this torch build or no C compiler here")
    return kernel


@pytest.fixture
def fresh_lookup(monkeypatch):
    """The lookup with its own table and no kernel checked yet."""
    monkeypatch.setattr(expert_kernels, "KERNELS", dict(expert_kernels.KERNELS))
    monkeypatch.setattr(expert_kernels, "_CHECKED", {})
    return expert_kernels


# --- MKL's grouped matmul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [[5, 0, 17, 1, 0, 9], [0, 0, 0], [64] * 4, [1] + [0] * 30])
def test_mkl_gives_each_group_its_own_product(mkl, sizes, dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(sum(sizes), 24, generator=gen, dtype=dtype)
    b = torch.randn(len(sizes), 24, 10, generator=gen, dtype=dtype)
    out = torch.full((sum(sizes), 10), float("nan"), dtype=dtype)
    assert mkl(a, b, sizes, out) is out
    torch.testing.assert_close(out, _per_group(a, b, sizes))


def test_mkl_reads_and_writes_column_slices_of_wider_buffers(mkl):
    gen = torch.Generator().manual_seed(1)
    sizes = [3, 0, 4, 2]
    wide = torch.randn(9, 40, generator=gen)
    b = torch.randn(4, 20, 12, generator=gen)[:, :, 2:9]  # each group's matrix with a row stride of 12
    out = torch.zeros(9, 30)
    mkl(wide[:, 10:30], b, sizes, out[:, 5:12])
    torch.testing.assert_close(out[:, 5:12], _per_group(wide[:, 10:30], b, sizes))
    assert not out[:, :5].any() and not out[:, 12:].any()  # nothing written outside the slice


@pytest.mark.parametrize("case, message", [
    (lambda: (torch.ones(5, 4), torch.ones(2, 4, 3), [2, 2], torch.ones(5, 3)), "do not split"),
    (lambda: (torch.ones(4, 4), torch.ones(2, 4, 3), [2, 2], torch.ones(4, 2)), "cannot multiply"),
    (lambda: (torch.ones(4, 4).t(), torch.ones(2, 4, 3), [2, 2], torch.ones(4, 3)), "contiguous"),
    (lambda: (torch.ones(4, 4), torch.ones(2, 4, 3, dtype=torch.float64), [2, 2], torch.ones(4, 3)), "one dtype"),
    (lambda: (torch.ones(4, 4), torch.ones(2, 4, 3), [5, -1], torch.ones(4, 3)), "do not split"),
])
def test_mkl_refuses_what_it_would_read_or_write_out_of_bounds(mkl, case, message):
    with pytest.raises(ValueError, match=message):
        mkl(*case())


def test_mkl_takes_no_other_dtype(mkl):
    with pytest.raises(NotImplementedError):
        mkl(torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(1, 4, 3, dtype=torch.bfloat16), [2],
            torch.ones(2, 3, dtype=torch.bfloat16))


# --- the fused CPU experts


def _problem(rows, k, count, hidden, inter, seed=0, invalid=True, skew=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen)
    ids = torch.randint(-1 if invalid else 0, count, (rows, k), generator=gen)
    if skew:  # most slots on expert 0: more than one block of rows for it
        ids[:, 0] = 0
    weights = torch.rand(rows, k, generator=gen)
    gate_up = torch.randn(count, hidden, 2 * inter, generator=gen) * 0.1
    down = torch.randn(count, inter, hidden, generator=gen) * 0.1
    return x, ids, weights, gate_up, down


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [
    dict(rows=7, k=3, count=4, hidden=16, inter=8),
    dict(rows=300, k=2, count=3, hidden=24, inter=12, skew=True),  # 300+ slots on one expert: several blocks
    dict(rows=5, k=1, count=64, hidden=8, inter=4, invalid=False),
    dict(rows=0, k=4, count=4, hidden=8, inter=4),
])
def test_fused_experts_give_the_slot_by_slot_result(fused, shape, threads):
    x, ids, weights, gate_up, down = _problem(**shape)
    results = torch.empty(ids.numel(), x.shape[1])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = fused(x, ids, weights, gate_up, down, results, torch.full_like(x, float("nan")))
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out, _slot_by_slot(x, ids, weights, gate_up, down), rtol=1e-5, atol=1e-6)


def test_fused_experts_give_zeros_for_rows_with_no_slot_here(fused):
    x, ids, weights, gate_up, down = _problem(6, 2, 4, 8, 4)
    ids[2:4] = -1
    out = fused(x, ids, weights, gate_up, down, torch.empty(12, 8), torch.full_like(x, float("nan")))
    assert torch.equal(out[2:4], torch.zeros(2, 8))


def test_fused_experts_answer_the_same_on_any_number_of_threads(fused):
    x, ids, weights, gate_up, down = _problem(200, 4, 8, 32, 16, seed=3)
    outs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(fused(x, ids, weights, gate_up, down, torch.empty(800, 32), torch.empty_like(x)))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])  # every sum in a fixed order


@pytest.mark.parametrize("change, error", [
    (lambda p: {**p, "x": p["x"].double()}, NotImplementedError),
    (lambda p: {**p, "x": p["x"].t().contiguous().t()}, ValueError),
    (lambda p: {**p, "local_ids": p["local_ids"].int()}, ValueError),
    (lambda p: {**p, "results": p["results"][:-1]}, ValueError),
    (lambda p: {**p, "down": p["down"][:, :-1]}, ValueError),
    (lambda p: {**p, "weights": p["weights"][:, :1]}, ValueError),
])
def test_fused_experts_refuse_what_they_would_read_or_write_out_of_bounds(fused, change, error):
    x, ids, weights, gate_up, down = _problem(6, 2, 4, 8, 4)
    args = dict(x=x, local_ids=ids, weights=weights, gate_up=gate_up, down=down, results=torch.empty(12, 8),
                out=torch.empty_like(x))
    with pytest.raises(error):
        fused(**change(args))


def test_the_build_is_kept_and_a_failed_one_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPORT_CACHE_DIR", str(tmp_path))
    if cpu_fused_experts.build() is None:
        pytest.skip("no C compiler here")
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert cpu_fused_experts.build() == built[0] and built[0].stat().st_mtime_ns == stamp  # kept, not rebuilt
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: fatal error: no input' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.warns(UserWarning, match="no input"):
        assert cpu_fused_experts.build(str(failing)) is None
    assert cpu_fused_experts.build(str(tmp_path / "no-such-compiler")) is None  # no compiler: quietly none


def test_ranks_building_at_once_each_load_a_whole_library(tmp_path):
    script = ("import ctypes; from moeport.backends.cpu_fused_experts import build; "
              "path = build(); path and ctypes.CDLL(str(path)); print(path)")
    env = {**os.environ, "MOEPORT_CACHE_DIR": str(tmp_path)}
    ranks = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    paths = {rank.communicate(timeout=120)[0].strip() for rank in ranks}
    assert all(rank.returncode == 0 for rank in ranks)
    assert len(paths) == 1 and len(list((tmp_path / "kernels").iterdir())) == (0 if paths == {"None"} else 1)


# --- the lookup


def test_the_cpu_offers_both_kinds_where_this_machine_can_run_them(fresh_lookup):
    assert fresh_lookup.KERNELS[("grouped_matmul", "cpu")] == "moeport.backends.mkl_grouped_matmul:grouped_matmul"
    assert fresh_lookup.KERNELS[("fused_experts", "cpu")] == "moeport.backends.cpu_fused_experts:fused_experts"
    cpu = torch.device("cpu")
    assert fresh_lookup.kernel_for("grouped_matmul", cpu, torch.float32) is mkl_grouped_matmul.grouped_matmul()
    assert fresh_lookup.kernel_for("fused_experts", cpu, torch.float32) is cpu_fused_experts.fused_experts()
    assert fresh_lookup.kernel_for("grouped_matmul", cpu, torch.bfloat16) is None  # not a dtype they take
    assert fresh_lookup.kernel_for("fused_experts", cpu, torch.float64) is None
    assert fresh_lookup.kernel_for("grouped_matmul", torch.device("meta"), torch.float32) is None  # none named


def _wrong(*args):
    return args[-1].zero_()


def _raises(*args):
    raise RuntimeError("broken kernel")


@pytest.mark.parametrize("kind", ["grouped_matmul", "fused_experts"])
@pytest.mark.parametrize("kernel", [_wrong, _raises], ids=["wrong-answer", "raises"])
def test_a_kernel_that_fails_its_check_is_not_used_and_says_so(fresh_lookup, kind, kernel):
    fresh_lookup.register(kind, "cpu", kernel)
    with pytest.warns(UserWarning, match="failed its check"):
        assert fresh_lookup.kernel_for(kind, torch.device("cpu"), torch.float32) is None


def test_a_kernel_that_does_not_import_is_an_error_naming_it(fresh_lookup):
    from moeport.base.errors import UserError

    fresh_lookup.register("fused_experts", "cpu", "no_such_vendor.kernels:fused")
    with pytest.raises(UserError, match="no_such_vendor.kernels:fused.*failed to import"):
        fresh_lookup.kernel_for("fused_experts", torch.device("cpu"), torch.float32)


def test_a_registered_kernel_replaces_the_earlier_one_and_is_checked_again(fresh_lookup):
    calls = []

    def per_group(a, b, sizes, out):
        calls.append(len(sizes))
        return out.copy_(_per_group(a, b, sizes))

    fresh_lookup.register("grouped_matmul", "cpu", _wrong)
    with pytest.warns(UserWarning):
        assert fresh_lookup.kernel_for("grouped_matmul", torch.device("cpu"), torch.float32) is None
    fresh_lookup.register("grouped_matmul", "cpu", per_group)
    assert fresh_lookup.kernel_for("grouped_matmul", torch.device("cpu"), torch.float32) is per_group
    assert fresh_lookup.kernel_for("grouped_matmul", torch.device("cpu"), torch.float32) is per_group
    assert calls == [4]  # checked once, on first use
    with pytest.raises(ValueError, match="unknown kernel kind"):
        fresh_lookup.register("grouped_mm", "cpu", per_group)
