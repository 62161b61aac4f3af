"""Devices' expert kernels: the lookup that checks them, MKL's grouped matmul and the fused CPU experts.

Whether this machine must have each CPU kernel is decided from the machine itself
(`missing_prerequisites`: a C++ compiler, ninja, the MKL symbols in torch's CPU
library, torch's own grouped matmul), never from the kernels' availability checks:
where everything a kernel needs is here and the kernel is not (a build that fails,
a probe that refuses), its tests fail; they skip only where a prerequisite is
truly missing, and say which.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

from moeport.backends.cpu import CPUBackend
from moeport.base.errors import UserError
from moeport.kernels import HOST_CPU, KINDS, cpu_fused_experts, mkl_grouped_matmul, torch_grouped_mm
from moeport.kernels.offered import OfferedKernels

CPU = torch.device("cpu")

#: What each of the CPU's kernels is, for messages.
KERNELS = {"fused_experts": "the fused CPU experts (torch.ops.moeport.fused_experts)",
           "grouped_matmul": "MKL's grouped matmul", "grouped_mm": "torch's grouped matmul (F.grouped_mm)"}


def _exported(symbol: str) -> bool:
    library = mkl_grouped_matmul.torch_cpu_library()
    return library is not None and getattr(library, symbol, None) is not None


def _build_tools_missing() -> list[str]:
    """What the fused experts' build lacks here: the C++ compiler cpp_extension uses ($CXX, else c++), ninja."""
    compiler = os.environ.get("CXX") or "c++"
    missing = [] if shutil.which(compiler) else [f"no C++ compiler ({compiler})"]
    return missing + ([] if cpp_extension.is_ninja_available() else ["no ninja"])


def _torch_grouped_mm_multiplies() -> bool:
    """Whether torch's F.grouped_mm, called directly, multiplies float32 groups on the CPU right."""
    grouped = getattr(F, "grouped_mm", None)
    if grouped is None:
        return False
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(-3, 4, (6, 16), generator=gen).float(), torch.randint(-3, 4, (2, 16, 8), generator=gen).float()
    try:
        out = grouped(a, b, offs=torch.tensor([2, 6], dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return torch.equal(out, torch.cat([a[:2] @ b[0], a[2:] @ b[1]]))


def missing_prerequisites(kind: str) -> list[str]:
    """What this machine lacks for the CPU kernel `kind` (a key of KERNELS); [] where it has it all, so the kernel
    must be there."""
    if kind == "fused_experts":
        mkl = [] if _exported("sgemm_") else ["torch's CPU library exports no MKL sgemm_"]
        return _build_tools_missing() + mkl
    if kind == "grouped_matmul":
        return [] if _exported("cblas_sgemm_batch") else ["torch's CPU library exports no MKL cblas_sgemm_batch"]
    if kind == "grouped_mm":
        return [] if _torch_grouped_mm_multiplies() else ["torch has no F.grouped_mm for float32 on the CPU"]
    raise ValueError(kind)


def require(kind: str, present):
    """`present` (a kernel, or True) where it is there; a failure where this machine has everything `kind` needs
    (a broken build or probe is a failure, not a skip); a skip naming what is missing otherwise."""
    if present is not None and present is not False:
        return present
    missing = missing_prerequisites(kind)
    if missing:
        pytest.skip(f"{KERNELS[kind]} cannot run here: {'; '.join(missing)}")
    pytest.fail(f"{KERNELS[kind]} is missing although this machine has everything it needs "
                f"(see missing_prerequisites): its build, its check or its probe failed")


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
    return require("grouped_matmul", mkl_grouped_matmul.grouped_matmul())


@pytest.fixture
def fused():
    return require("fused_experts", cpu_fused_experts.fused_experts())


def test_every_cpu_kernel_this_machine_has_the_prerequisites_for_is_there():
    """Where the machine has a C++ compiler, ninja and MKL's sgemm_ in torch's CPU library, the fused experts are
    built and pass their check; where it exports cblas_sgemm_batch, MKL's grouped matmul is there; where torch's
    F.grouped_mm multiplies float32 on the CPU, the probe takes it. CI is such a machine."""
    offered = OfferedKernels(HOST_CPU, "cpu")
    there = {
        "fused_experts": cpu_fused_experts.fused_experts() is not None
        and offered.kernel("fused_experts", CPU, torch.float32) is not None,
        "grouped_matmul": mkl_grouped_matmul.grouped_matmul() is not None
        and offered.kernel("grouped_matmul", CPU, torch.float32) is not None,
        "grouped_mm": torch_grouped_mm.works(CPU, torch.float32),
    }
    assert set(KINDS) < set(there)
    missing = {kind: missing_prerequisites(kind) for kind in there}
    absent = [f"{KERNELS[kind]}" for kind in there if not missing[kind] and not there[kind]]
    assert not absent, f"not there although this machine has everything they need: {absent}"
    if all(missing.values()):
        pytest.skip(f"this machine has none of the CPU kernels' prerequisites: {missing}")


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


def test_the_fused_experts_are_one_operator_that_the_profiler_names(fused):
    x, ids, weights, gate_up, down = _problem(9, 2, 4, 16, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fused(x, ids, weights, gate_up, down, torch.empty(18, 16), torch.empty_like(x))
    assert "moeport::fused_experts" in {event.name for event in profile.events()}


def test_torch_compile_takes_the_fused_experts_as_one_opaque_call(fused):
    x, ids, weights, gate_up, down = _problem(9, 2, 4, 16, 8, seed=4)

    def layer(x, ids, weights, gate_up, down):
        out, results = torch.empty_like(x), torch.empty(ids.numel(), x.shape[1])
        torch.ops.moeport.fused_experts(x, ids, weights, gate_up, down, results, out)
        return out * 2 + x

    targets = []

    def recording(graph, inputs):  # a torch.compile backend that keeps the traced graph's calls, then runs it
        targets.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    eager = layer(x, ids, weights, gate_up, down)
    traced = torch.compile(layer, backend=recording, fullgraph=True)(x, ids, weights, gate_up, down)
    assert targets.count("moeport.fused_experts") == 1  # traced as one call, no graph break
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, ids, weights, gate_up, down)  # its fake
    assert torch.equal(traced, eager) and torch.equal(compiled, eager)


BUILD_TWICE = textwrap.dedent("""
    import os, shutil, sys, warnings
    from moeport.kernels import cpu_fused_experts as kernel

    stale = kernel.build_directory(shutil.which(os.environ.get("CXX") or "c++") or "c++") / "variant-0" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()  # left by a build that was killed an hour ago
    os.utime(stale, (stale.stat().st_atime - 3600, stale.stat().st_mtime - 3600))
    first = kernel.build()
    if first is None:
        print("none")
        sys.exit(0)
    stamp = first.stat().st_mtime_ns
    again = kernel.build()
    print("kept" if again == first and first.stat().st_mtime_ns == stamp else "rebuilt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failed = kernel.build(sys.argv[1])
    print("failed" if failed is None else "built", *[str(w.message) for w in caught], sep="|")
    print("missing" if kernel.build(sys.argv[2]) is None else "found", len(caught))
""")


def test_the_build_is_kept_and_a_failed_one_says_why(tmp_path):
    """In a fresh process (a build registers the operator's CPU kernel, which a test process may hold already):
    a lock file left by a killed build does not stop it, a second call loads the first build, a failing
    compiler says why, a missing one is quietly none."""
    failing = tmp_path / "c++"
    failing.write_text("#!/bin/sh\necho 'c++: fatal error: no input' >&2\nexit 1\n")
    failing.chmod(0o755)
    script = tmp_path / "build.py"
    script.write_text(BUILD_TWICE)
    env = {**os.environ, "MOEPORT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(script), str(failing), str(tmp_path / "no-such-compiler")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    if lines == ["none"]:
        missing = _build_tools_missing()
        assert missing, "this machine has a C++ compiler and ninja, yet the build failed"
        pytest.skip(f"nothing to build with: {'; '.join(missing)}")
    assert lines[0] == "kept"  # the second call loads the first build
    failed, *messages = lines[1].split("|")
    assert failed == "failed" and len(messages) == 1 and "no input" in messages[0]
    assert lines[2] == "missing 1"  # no compiler: quietly none
    assert len(list((tmp_path / "cache" / "kernels").glob("*/variant-*/*.so"))) == 1


def test_ranks_building_at_once_each_load_a_whole_library(tmp_path):
    script = "from moeport.kernels.cpu_fused_experts import fused_experts; print(fused_experts() is not None)"
    env = {**os.environ, "MOEPORT_CACHE_DIR": str(tmp_path)}
    ranks = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    answers = {rank.communicate(timeout=300)[0].strip() for rank in ranks}
    assert all(rank.returncode == 0 for rank in ranks)
    assert len(answers) == 1
    if not missing_prerequisites("fused_experts"):
        assert answers == {"True"}, "this machine has everything the fused experts need, yet no rank has them"
    built = list(tmp_path.glob("kernels/*/variant-*/*.so")) if tmp_path.joinpath("kernels").exists() else []
    assert len(built) == (1 if answers == {"True"} else 0)


# --- the kernels a device offers


def test_the_cpu_offers_both_kinds_where_this_machine_can_run_them():
    assert CPUBackend.expert_kernels == HOST_CPU
    assert HOST_CPU["grouped_matmul"] == "moeport.kernels.mkl_grouped_matmul:grouped_matmul"
    assert HOST_CPU["fused_experts"] == "moeport.kernels.cpu_fused_experts:fused_experts"
    offered, cpu = CPUBackend().offered_expert_kernels, torch.device("cpu")
    assert offered.kernel("grouped_matmul", cpu, torch.float32) is mkl_grouped_matmul.grouped_matmul()
    assert offered.kernel("fused_experts", cpu, torch.float32) is cpu_fused_experts.fused_experts()
    assert offered.kernel("grouped_matmul", cpu, torch.bfloat16) is None  # not a dtype they take
    assert offered.kernel("fused_experts", cpu, torch.float64) is None
    assert offered.kernel("grouped_matmul", torch.device("meta"), torch.float32) is None  # not this device


def _wrong(*args):
    return args[-1].zero_()


def _raises(*args):
    raise RuntimeError("broken kernel")


@pytest.mark.parametrize("kind", ["grouped_matmul", "fused_experts"])
@pytest.mark.parametrize("kernel", [_wrong, _raises], ids=["wrong-answer", "raises"])
def test_a_kernel_that_fails_its_check_is_not_used_and_says_so(kind, kernel):
    offered = OfferedKernels({kind: kernel}, "cpu", "tests:Backend")
    with pytest.warns(UserWarning, match="failed its check"):
        assert offered.kernel(kind, torch.device("cpu"), torch.float32) is None


def test_a_kernel_that_does_not_import_is_an_error_naming_it():
    offered = OfferedKernels({"fused_experts": "no_such_vendor.kernels:fused"}, "cpu")
    with pytest.raises(UserError, match="no_such_vendor.kernels:fused.*failed to import"):
        offered.kernel("fused_experts", torch.device("cpu"), torch.float32)


def test_a_kernel_is_checked_once_per_dtype_on_first_use_and_unknown_kinds_are_refused():
    calls = []

    def per_group(a, b, sizes, out):
        calls.append(a.dtype)
        return out.copy_(_per_group(a, b, sizes))

    offered = OfferedKernels({"grouped_matmul": per_group}, "cpu")
    assert calls == []  # nothing is checked before it is asked for
    for _ in range(3):
        assert offered.kernel("grouped_matmul", torch.device("cpu"), torch.float32) is per_group
    assert offered.kernel("grouped_matmul", torch.device("cpu"), torch.float64) is per_group
    assert calls == [torch.float32, torch.float64]
    with pytest.raises(UserError, match="tests:Chip: expert_kernels: unknown kind 'grouped_mm'"):
        OfferedKernels({"grouped_mm": per_group}, "cpu", "tests:Chip")
