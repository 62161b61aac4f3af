"""Expert-parallel dispatch / combine and the differentiable collectives, on real spawned ranks.

Every rank can regenerate every rank's inputs from a seed, so each rank checks
what it received row by row and bit for bit, and what combine gave back against
`reference_moe` run in one process. Data are rank-tagged small integers with
power-of-two weights, so sums are exact in every dtype and the comparisons are
exact; "bits" cases move random values and check only that they travel
untouched. One spawn per (profile, world size) runs every case; the rank-side
checks return problems as strings, so a wrong answer never stops the collectives.
"""

from __future__ import annotations

import functools

import pytest
import torch

from moeport.collectives import differentiable as diff
from moeport.collectives.differentiable import RowFormat, pack_rows, unpack_rows
from moeport.collectives.expert_layout import ExpertLayout, route
from moeport.collectives.expert_parallel import ExpertInput, ExpertParallelDispatcher
from moeport.collectives.local import LocalCommunicator
from moeport.collectives.low_latency import LowLatencyDispatcher
from moeport.profile import load_profile
from moeport.testing import run_ranks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- the single-process reference ----------------------------------------------------
def reference_moe(hidden, topk_ids, topk_weights, n_routed_experts, expert_fn):
    """The MoE combine in one process: out[t] = sum over FFN slots j of w[t, j] * expert_fn(ids[t, j], hidden[t]).

    Slots with ids outside [0, n_routed_experts) (zero experts, -1) add nothing:
    the model applies zero experts itself. Differentiable; result in hidden's dtype.
    """
    out = hidden.new_zeros(hidden.shape)
    for e in topk_ids.unique().tolist():
        if 0 <= e < n_routed_experts:
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            contrib = topk_weights[tok, slot, None] * expert_fn(e, hidden[tok])
            out = out.index_add(0, tok, contrib.to(out.dtype))
    return out


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    int_dtype = INT_OF[a.element_size()]
    return torch.equal(a.contiguous().view(int_dtype), b.contiguous().view(int_dtype))


# -- the cases ---------------------------------------------------------------------------
def case(name, world, n_routed, n_zero, k, d, tokens, routing="random", dtype="float32", values="ints", seed=1):
    """One dispatch / combine scenario for `world` ranks (plain dict: it travels to the ranks)."""
    if isinstance(tokens, int):
        tokens = [tokens] * world
    return dict(name=name, n_routed=n_routed, n_zero=n_zero, k=k, d=d, tokens=tokens, routing=routing,
                dtype=dtype, values=values, seed=seed)


def cases_for(world: int) -> list[dict]:
    """Every scenario at one world size (2 FFN experts per rank unless said)."""
    n = 2 * world
    mixed = [12 + 5 * r for r in range(world)]
    if world >= 3:
        mixed[1] = 0  # a rank with no tokens among ranks with some
    return [
        case("random", world, n, 4, 4, 64, mixed),
        case("one rank per token", world, n, 2, 2, 8, 6, routing="one_rank", seed=2),
        case("last rank receives nothing", world, n, 2, 3, 8, 7, routing="skip_last", seed=3),
        case("no tokens", world, n, 2, 2, 8, 0, seed=4),
        case("every token to expert 0", world, n, 3, 3, 8, [5 + r for r in range(world)], routing="one_expert"),
        case("top-k = all experts", world, n, 2, n + 2, 8, 4, routing="all", seed=5),
        case("one expert per rank", world, world, 2, 2, 16, 9, seed=6),
        case("bfloat16", world, n, 2, 3, 16, 10, dtype="bfloat16", values="small", seed=7),
        case("float16", world, n, 2, 3, 16, 10, dtype="float16", values="small", seed=8),
        case("bfloat16 bits", world, n, 2, 3, 33, 11, dtype="bfloat16", values="bits", seed=9),
        case("float16 bits, odd width", world, n, 2, 3, 7, 11, dtype="float16", values="bits", seed=10),
        case("float32 bits", world, n, 2, 4, 16, 11, values="bits", seed=11),
        case("random again, larger", world, n, 4, 4, 64, [30 + r for r in range(world)], seed=12),
    ]


def _routing(g, c, world, tokens):
    n, z, k = c["n_routed"], c["n_zero"], c["k"]
    per_rank = n // world
    rows = []
    for t in range(tokens):
        if c["routing"] == "one_rank":
            q = int(torch.randint(world, (1,), generator=g))
            ids = q * per_rank + torch.randperm(per_rank, generator=g)[:k]
        elif c["routing"] == "skip_last":
            allowed = torch.cat([torch.arange(n - per_rank), torch.arange(n, n + z)])
            ids = allowed[torch.randperm(len(allowed), generator=g)[:k]]
        elif c["routing"] == "one_expert":
            ids = torch.cat([torch.zeros(1, dtype=torch.int64), n + torch.randperm(z, generator=g)[: k - 1]])
        elif t == 0 and z >= k:
            ids = n + torch.randperm(z, generator=g)[:k]  # only zero experts
        elif t == 1 and per_rank >= k:
            ids = (t % world) * per_rank + torch.randperm(per_rank, generator=g)[:k]  # all on one rank
        else:
            ids = torch.randperm(n + z, generator=g)[:k]  # "random" and "all" (k = n + z)
        rows.append(ids)
    return torch.stack(rows) if rows else torch.zeros((0, k), dtype=torch.int64)


def inputs(c, rank, world, device="cpu"):
    """Rank `rank`'s hidden [T, d], topk ids [T, k] and weights [T, k] for case `c` (deterministic)."""
    g = torch.Generator().manual_seed(c["seed"] * 1000 + rank)
    tokens, d, k = c["tokens"][rank], c["d"], c["k"]
    ids = _routing(g, c, world, tokens)
    dtype = DTYPES[c["dtype"]]
    if c["values"] == "bits":
        hidden = torch.randn((tokens, d), generator=g).to(dtype)
        weights = torch.rand((tokens, k), generator=g)
    else:
        low, high, smallest = (-1, 2, 1) if c["values"] == "small" else (-2, 3, 2)
        hidden = torch.randint(low, high, (tokens, d), generator=g).to(dtype)
        hidden[:, 0] = rank + 1  # the tag
        weights = 2.0 ** -torch.randint(0, smallest + 1, (tokens, k), generator=g).float()
    return hidden.to(device), ids.to(device), weights.to(device)


def expected_received(c, rank, world):
    """What `rank` must receive, by plain loops over every rank's regenerated inputs."""
    per_rank = c["n_routed"] // world
    hidden, ids, weights, splits, sources = [], [], [], [], []
    for src in range(world):
        x, topk, w = inputs(c, src, world)
        count = 0
        for t in range(x.shape[0]):
            mine = [0 <= e < c["n_routed"] and e // per_rank == rank for e in topk[t].tolist()]
            if any(mine):
                hidden.append(x[t])
                ids.append([e - rank * per_rank if m else -1 for e, m in zip(topk[t].tolist(), mine)])
                weights.append(torch.where(torch.tensor(mine), w[t], torch.zeros(())))
                sources.append((src, t))
                count += 1
        splits.append(count)
    d, k, dtype = c["d"], c["k"], DTYPES[c["dtype"]]
    return dict(
        hidden=torch.stack(hidden) if hidden else torch.zeros((0, d), dtype=dtype),
        ids=torch.tensor(ids, dtype=torch.int64).reshape(-1, k),
        weights=torch.stack(weights) if weights else torch.zeros((0, k)),
        splits=splits, sources=sources,
    )


def lowest_destination(c, world, src, token):
    """The lowest rank owning one of the token's FFN experts."""
    _, topk, _ = inputs(c, src, world)
    per_rank = c["n_routed"] // world
    return min(e // per_rank for e in topk[token].tolist() if 0 <= e < c["n_routed"])


def scale_expert(e, h):
    """The test expert: expert e multiplies by (e + 1), exactly."""
    return h * (e + 1)


# -- what each rank runs ----------------------------------------------------------------------
def expert_side(c, rank, world, inp):
    """The experts of `rank` on what it received: one output row per received row."""
    per_rank = c["n_routed"] // world
    if c["values"] == "bits":  # the copy kept by the token's lowest destination rank, zeros elsewhere
        keep = [lowest_destination(c, world, s, t) == rank for s, t in expected_received(c, rank, world)["sources"]]
        keep_rows = torch.tensor(keep, dtype=torch.bool, device=inp.hidden.device)[:, None]
        return torch.where(keep_rows, inp.hidden, torch.zeros((), dtype=inp.hidden.dtype, device=inp.hidden.device))
    return reference_moe(inp.hidden, inp.local_ids, inp.weights, per_rank,
                         lambda le, h: scale_expert(le + rank * per_rank, h))


def expected_combined(c, rank, world):
    x, ids, w = inputs(c, rank, world)
    if c["values"] == "bits":
        has_ffn = (ids < c["n_routed"]).any(dim=1, keepdim=True)
        return torch.where(has_ffn, x, torch.zeros((), dtype=x.dtype))
    return reference_moe(x, ids, w, c["n_routed"], scale_expert)


def check_case(disp, c, comm, device, problems):
    """Dispatch and combine case `c` sync and async; note every difference from the expected rows."""
    rank, world = comm.rank, comm.world_size
    x, ids, w = inputs(c, rank, world, device)
    want = expected_received(c, rank, world)
    combined = expected_combined(c, rank, world)
    stats = None
    for async_op in (False, True):
        tag = f"{c['name']} ({'async' if async_op else 'sync'}) rank {rank}"
        inp = disp.dispatch(x, ids, w, async_op=async_op)
        inp = inp.wait() if async_op else inp
        if inp.recv_splits != want["splits"]:
            problems.append(f"{tag}: received splits {inp.recv_splits}, expected {want['splits']}")
        for field in ("hidden", "ids", "weights"):
            got = getattr(inp, "local_ids" if field == "ids" else field).cpu()
            if not bits_equal(got, want[field]):
                problems.append(f"{tag}: received {field} differ")
        out = disp.combine(inp, expert_side(c, rank, world, inp), async_op=async_op)
        out = out.wait() if async_op else out
        if not bits_equal(out.cpu(), combined):
            problems.append(f"{tag}: combined output differs from reference_moe")
        stats = inp.stats
    return stats_summary(c, rank, world, ids, stats, problems)


def check_low_latency_case(c, comm, device, problems):
    """The low-latency dispatch of case `c`, sync and async: the rows that travel are the normal dispatch's,
    in the same order, every other row is padding (no slot, zeros), and combine gives the same bits."""
    rank, world = comm.rank, comm.world_size
    room = max(c["tokens"]) + 3  # room to spare: padding in every block
    disp = LowLatencyDispatcher(comm, ExpertLayout(c["n_routed"], world), room)
    x, ids, w = inputs(c, rank, world, device)
    want = expected_received(c, rank, world)
    for async_op in (False, True):
        tag = f"{c['name']} (low-latency, {'async' if async_op else 'sync'}) rank {rank}"
        inp = disp.dispatch(x, ids, w, async_op=async_op)
        inp = inp.wait() if async_op else inp
        valid = (inp.local_ids >= 0).any(dim=1)
        if inp.hidden.shape[0] != world * room or inp.recv_splits != [room] * world:
            problems.append(f"{tag}: {inp.hidden.shape[0]} rows in blocks {inp.recv_splits}, expected {world} x {room}")
        for field in ("hidden", "ids", "weights"):
            got = getattr(inp, "local_ids" if field == "ids" else field)[valid].cpu()
            if not bits_equal(got, want[field]):
                problems.append(f"{tag}: received {field} differ from the normal dispatch's")
        if inp.hidden[~valid].count_nonzero() or inp.weights[~valid].count_nonzero():
            problems.append(f"{tag}: padding rows are not zeros")
        compact = ExpertInput(inp.hidden[valid], inp.local_ids[valid], inp.weights[valid], want["splits"], inp.plan,
                              inp.experts_per_rank)
        rows = torch.zeros_like(inp.hidden)
        rows[valid] = expert_side(c, rank, world, compact)
        out = disp.combine(inp, rows, async_op=async_op)
        out = out.wait() if async_op else out
        if not bits_equal(out.cpu(), expected_combined(c, rank, world)):
            problems.append(f"{tag}: combined output differs from reference_moe")


def stats_summary(c, rank, world, ids, stats, problems):
    """Check the traffic report against counts made here; return it as a dict."""
    per_rank = c["n_routed"] // world
    pairs = {(t, e // per_rank) for t, row in enumerate(ids.tolist()) for e in row if 0 <= e < c["n_routed"]}
    ffn_slots = int((ids < c["n_routed"]).sum())
    if stats.rows_sent != len(pairs) or stats.ffn_slots != ffn_slots:
        problems.append(f"{c['name']} rank {rank}: stats {stats} vs {len(pairs)} pairs, {ffn_slots} slots")
    if stats.rows_to_peers != sum(1 for _, q in pairs if q != rank):
        problems.append(f"{c['name']} rank {rank}: rows_to_peers {stats.rows_to_peers} wrong")
    return dict(name=c["name"], rows_sent=stats.rows_sent, rows_received=stats.rows_received,
                bytes_sent=stats.bytes_sent, naive_bytes=stats.naive_bytes, tokens=stats.tokens)


def check_buffer_reuse(comm, device, problems):
    """Two dispatches, larger then smaller: the second reuses the first's buffer; both arrive intact."""
    world = comm.world_size
    disp = ExpertParallelDispatcher(comm, 2 * world)
    big = case("reuse big", world, 2 * world, 2, 3, 32, 20, seed=21)
    small = case("reuse small", world, 2 * world, 2, 3, 16, 5, dtype="bfloat16", values="small", seed=22)
    first = disp.dispatch(*inputs(big, comm.rank, world, device))
    capacity = disp._recv.capacity
    first_storage = first.hidden.untyped_storage().data_ptr()
    check_case(disp, small, comm, device, problems)
    second = disp.dispatch(*inputs(small, comm.rank, world, device))
    if disp._recv.capacity != capacity or second.hidden.untyped_storage().data_ptr() != first_storage:
        problems.append(f"rank {comm.rank}: the smaller dispatch did not reuse the receive buffer")
    pending = disp.dispatch(*inputs(big, comm.rank, world, device), async_op=True)
    try:
        disp.dispatch(*inputs(small, comm.rank, world, device))
        problems.append(f"rank {comm.rank}: a dispatch while one was in flight was not refused")
    except RuntimeError:
        pass
    got = pending.wait()
    if not bits_equal(got.hidden.cpu(), expected_received(big, comm.rank, world)["hidden"]):
        problems.append(f"rank {comm.rank}: async dispatch after reuse differs")


# -- gradients ---------------------------------------------------------------------------------
def grad_spec(name, world, hidden_dtype, weights_dtype, async_op=False, seed=31):
    """A training case: tanh-linear experts, zero experts among the slots, a rank without tokens at world >= 3."""
    tokens = [7 + 3 * r for r in range(world)]
    if world >= 3:
        tokens[2] = 0
    return dict(name=name, n_routed=2 * world, n_zero=2, k=3, d=6, tokens=tokens, hidden=hidden_dtype,
                weights=weights_dtype, async_op=async_op, seed=seed)


def grad_inputs(s, rank):
    """Rank `rank`'s hidden, ids, weights and the upstream gradient of the MoE output."""
    g = torch.Generator().manual_seed(s["seed"] * 1000 + rank)
    tokens, d, k = s["tokens"][rank], s["d"], s["k"]
    ids = torch.stack([torch.randperm(s["n_routed"] + s["n_zero"], generator=g)[:k] for _ in range(tokens)]) \
        if tokens else torch.zeros((0, k), dtype=torch.int64)
    x = torch.randn((tokens, d), generator=g, dtype=torch.float64).to(DTYPES[s["hidden"]])
    w = torch.rand((tokens, k), generator=g, dtype=torch.float64).to(DTYPES[s["weights"]])
    upstream = torch.randn((tokens, d), generator=g, dtype=torch.float64).to(DTYPES[s["hidden"]])
    return x, ids, w, upstream


def expert_matrices(s):
    g = torch.Generator().manual_seed(s["seed"])
    return torch.randn((s["n_routed"], s["d"], s["d"]), generator=g, dtype=torch.float64).to(DTYPES[s["hidden"]])


def tanh_expert(matrices):
    return lambda e, h: torch.tanh(h @ matrices[e])


def reference_grads(s, rank, world):
    """d(sum over ranks of <moe_r, upstream_r>) / d(this rank's hidden, weights, and its experts' matrices)."""
    data = [grad_inputs(s, r) for r in range(world)]
    xs = [x.clone().requires_grad_() for x, _, _, _ in data]
    ws = [w.clone().requires_grad_() for _, _, w, _ in data]
    matrices = expert_matrices(s).requires_grad_()
    loss = sum((reference_moe(xs[r], data[r][1], ws[r], s["n_routed"], tanh_expert(matrices)) * data[r][3]).sum()
               for r in range(world))
    gx, gw, gm = torch.autograd.grad(loss, [xs[rank], ws[rank], matrices], allow_unused=True, materialize_grads=True)
    block = ExpertLayout(s["n_routed"], world).local_experts(rank)
    return gx, gw, gm[block.start: block.stop]


def check_grads(s, comm, device, problems):
    """Gradients through dispatch(differentiable=True) and combine equal the single-process reference's."""
    rank, world = comm.rank, comm.world_size
    x0, ids, w0, upstream = grad_inputs(s, rank)
    x, w = x0.to(device).requires_grad_(), w0.to(device).requires_grad_()
    block = ExpertLayout(s["n_routed"], world).local_experts(rank)
    local = expert_matrices(s)[block.start: block.stop].to(device).requires_grad_()
    disp = ExpertParallelDispatcher(comm, s["n_routed"])
    inp = disp.dispatch(x, ids.to(device), w, async_op=s["async_op"], differentiable=True)
    inp = inp.wait() if s["async_op"] else inp
    rows = reference_moe(inp.hidden, inp.local_ids, inp.weights, len(block), tanh_expert(local))
    out = disp.combine(inp, rows, async_op=s["async_op"])
    out = out.wait() if s["async_op"] else out
    loss = (out * upstream.to(device)).sum()
    got = torch.autograd.grad(loss, [x, w, local], allow_unused=True, materialize_grads=True)
    tol = dict(rtol=1e-9, atol=1e-12) if s["hidden"] == s["weights"] == "float64" else dict(rtol=1e-4, atol=1e-5)
    for name, g, ref in zip(("hidden", "weights", "experts"), got, reference_grads(s, rank, world)):
        if g.dtype != ref.dtype or not torch.allclose(g.cpu(), ref, **tol):
            problems.append(f"{s['name']} rank {rank}: gradient of {name} differs from the reference")


# -- the differentiable collectives ---------------------------------------------------------
def _a2a_splits(world):
    """send[src][dst] rows: uneven, with zero-size splits."""
    return [[(src + 2 * dst) % 3 for dst in range(world)] for src in range(world)]


def _local_all_to_all(xs, send):
    world = len(xs)
    starts = [[sum(send[s][:q]) for q in range(world)] for s in range(world)]
    return [torch.cat([xs[s][starts[s][q]: starts[s][q] + send[s][q]] for s in range(world)]) for q in range(world)]


def _tensor(rank, rows, width, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn((rows, width), generator=g, dtype=torch.float64).to(dtype)


def _grad_of_sum(fn, xs, weights):
    """d/dxs of sum over ranks of <fn(xs)[r], weights[r]>, in one process."""
    xs = [x.clone().requires_grad_() for x in xs]
    loss = sum((o * c).sum() for o, c in zip(fn(xs), weights))
    return torch.autograd.grad(loss, xs)


def check_differentiable(comm, problems):
    """all_to_all (one tensor and several, sync and async), all_gather and reduce_scatter: outputs
    equal the single-process simulation and gradients its autograd gradients."""
    rank, world = comm.rank, comm.world_size
    send = _a2a_splits(world)
    recv = [[send[s][q] for s in range(world)] for q in range(world)]
    rows = [sum(send[r]) for r in range(world)]
    xs = [_tensor(r, rows[r], 3, 1) for r in range(world)]
    cs = [_tensor(r, sum(recv[r]), 3, 2) for r in range(world)]

    x = xs[rank].clone().requires_grad_()
    out = diff.all_to_all(comm, x, send[rank], recv[rank])
    ref_out = _local_all_to_all(xs, send)[rank]
    (grad,) = torch.autograd.grad((out * cs[rank]).sum(), [x])
    (ref,) = [_grad_of_sum(lambda v: _local_all_to_all(v, send), xs, cs)[rank]]
    _note(problems, f"all_to_all rank {rank}", out, ref_out, grad, ref)

    ys = [_tensor(r, rows[r], 2, 3, torch.float32) for r in range(world)]
    tags = [torch.arange(rows[r], dtype=torch.int32)[:, None] + 100 * r for r in range(world)]
    x, y = xs[rank].clone().requires_grad_(), ys[rank].clone().requires_grad_()
    dys = [_tensor(r, sum(recv[r]), 2, 4, torch.float32) for r in range(world)]
    ox, oy, otag = diff.all_to_all(comm, [x, y, tags[rank]], send[rank], recv[rank], async_op=True).wait()
    if otag.requires_grad or not torch.equal(otag, _local_all_to_all(tags, send)[rank]):
        problems.append(f"packed all_to_all rank {rank}: integer field wrong or differentiable")
    gx, gy = torch.autograd.grad((ox * cs[rank]).sum() + (oy * dys[rank]).sum(), [x, y])
    _note(problems, f"packed all_to_all x rank {rank}", ox, ref_out, gx, ref)
    ref_y = _grad_of_sum(lambda v: _local_all_to_all(v, send), ys, dys)[rank]
    _note(problems, f"packed all_to_all y rank {rank}", oy, _local_all_to_all(ys, send)[rank], gy, ref_y)

    gathered_c = [_tensor(r, 2 * world, 3, 5) for r in range(world)]
    parts = [_tensor(r, 2, 3, 6) for r in range(world)]
    x = parts[rank].clone().requires_grad_()
    out = diff.all_gather(comm, x)
    (grad,) = torch.autograd.grad((out * gathered_c[rank]).sum(), [x])
    ref = _grad_of_sum(lambda v: [torch.cat(v)] * world, parts, gathered_c)[rank]
    _note(problems, f"all_gather rank {rank}", out, torch.cat(parts), grad, ref)

    fulls = [_tensor(r, 2 * world, 3, 7) for r in range(world)]
    x = fulls[rank].clone().requires_grad_()
    out = diff.reduce_scatter(comm, x)
    scatter_c = [_tensor(r, 2, 3, 8) for r in range(world)]

    def local_reduce_scatter(v):
        total = sum(v)
        return [total[2 * r: 2 * r + 2] for r in range(world)]

    (grad,) = torch.autograd.grad((out * scatter_c[rank]).sum(), [x])
    ref = _grad_of_sum(local_reduce_scatter, fulls, scatter_c)[rank]
    _note(problems, f"reduce_scatter rank {rank}", out, local_reduce_scatter(fulls)[rank], grad, ref)


def _note(problems, what, out, ref_out, grad, ref_grad):
    if not torch.allclose(out, ref_out, rtol=1e-12, atol=1e-12):
        problems.append(f"{what}: output differs")
    if not torch.allclose(grad, ref_grad, rtol=1e-12, atol=1e-12):
        problems.append(f"{what}: gradient differs")


# -- one spawn per (profile, world size) ----------------------------------------------------
def suite(rt, cases, grad_specs):
    """Everything, on one rank: dispatch/combine cases, buffer reuse, gradients, differentiable collectives."""
    comm, problems = rt.groups.ep, []
    dispatchers = {}
    stats = []
    for c in cases:
        disp = dispatchers.setdefault(c["n_routed"], ExpertParallelDispatcher(comm, c["n_routed"]))
        stats.append(check_case(disp, c, comm, rt.device, problems))
        check_low_latency_case(c, comm, rt.device, problems)
    check_buffer_reuse(comm, rt.device, problems)
    grad_problems: list[str] = []
    for s in grad_specs:
        check_grads(s, comm, rt.device, grad_problems)
    diff_problems: list[str] = []
    check_differentiable(comm, diff_problems)
    return dict(problems=problems, stats=stats, grad_problems=grad_problems, diff_problems=diff_problems,
                ep=comm.global_ranks)


def grad_specs_for(world):
    return [
        grad_spec("float64", world, "float64", "float64"),
        grad_spec("float64 async", world, "float64", "float64", async_op=True, seed=32),
        grad_spec("float32", world, "float32", "float32", seed=33),
        grad_spec("float64 hidden, float32 weights", world, "float64", "float32", seed=34),
    ]


@functools.lru_cache(maxsize=None)
def suite_results(profile: str, world: int, ep: int | None = None, fallbacks: tuple[str, ...] = ()):
    """Run `suite` once per argument set (tests below share the spawn)."""
    loaded = load_profile(profile)
    if ep is not None:
        loaded = loaded.replace(**{"parallel.ep": ep})
    if fallbacks:
        loaded = loaded.replace(**{"collectives.fallbacks": list(fallbacks)})
    group = ep or world
    return run_ranks(suite, world, loaded.with_world_size(world), args=(cases_for(group), grad_specs_for(group)),
                     timeout_s=150)


PARAMS = [(p, w) for p in ("cpu-gloo", "generic-cpu") for w in (2, 3, 4)]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("profile,world", PARAMS)
def test_dispatch_and_combine_exact(profile, world):
    for result in suite_results(profile, world):
        assert result["problems"] == []


@pytest.mark.timeout(200)
@pytest.mark.parametrize("profile,world", PARAMS)
def test_traffic_stats(profile, world):
    per_case = {}
    for rank, result in enumerate(suite_results(profile, world)):
        for s in result["stats"]:
            per_case.setdefault(s["name"], []).append(s)
            if s["name"].startswith("random") and s["tokens"]:
                assert s["bytes_sent"] < s["naive_bytes"], s
    assert [s["rows_received"] for s in per_case["last rank receives nothing"]][-1] == 0
    assert all(s["rows_received"] == 0 for s in per_case["every token to expert 0"][1:])
    assert all(s["rows_sent"] == s["rows_received"] == 0 for s in per_case["no tokens"])
    for name, rows in per_case.items():  # what was sent was received
        assert sum(s["rows_sent"] for s in rows) == sum(s["rows_received"] for s in rows), name
    if world >= 3:
        assert per_case["random"][1]["tokens"] == 0 and per_case["random"][1]["rows_sent"] == 0


@pytest.mark.timeout(200)
@pytest.mark.parametrize("profile,world", PARAMS)
def test_gradients_match_reference(profile, world):
    for result in suite_results(profile, world):
        assert result["grad_problems"] == []


@pytest.mark.timeout(200)
@pytest.mark.parametrize("profile,world", PARAMS)
def test_differentiable_collectives(profile, world):
    for result in suite_results(profile, world):
        assert result["diff_problems"] == []


@pytest.mark.timeout(200)
def test_subgroups_with_forced_fallbacks():
    """ep = 2 inside 4 ranks, with the synchronous 'async' and the all_reduce reduce_scatter fallbacks forced."""
    results = suite_results("cpu-gloo", 4, ep=2, fallbacks=("async", "reduce_scatter"))
    assert [r["ep"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for r in results:
        assert r["problems"] == r["grad_problems"] == r["diff_problems"] == []


def one_dispatch(rt, c):
    """One dispatch and combine of case `c`; returns the problems found."""
    problems: list[str] = []
    check_case(ExpertParallelDispatcher(rt.groups.ep, c["n_routed"]), c, rt.groups.ep, rt.device, problems)
    return problems


@pytest.mark.timeout(60)
def test_forced_uneven_all_to_all_fallback():
    """Every rank pads under the fallback, also one whose own splits happen to be equal."""
    c = case("reuse big", 2, 4, 2, 3, 32, 20, seed=21)  # rank 0 sends and receives [17, 17]; rank 1 [17, 18]
    profile = load_profile("cpu-gloo").replace(**{"collectives.fallbacks": ["uneven_all_to_all"],
                                                  "collectives.timeout_s": 5})
    for problems in run_ranks(one_dispatch, 2, profile, args=(c,), timeout_s=40):
        assert problems == []


# -- in one process ----------------------------------------------------------------------------
def test_layout():
    layout = ExpertLayout(12, 3)
    assert layout.experts_per_rank == 4 and layout.local_experts(2) == range(8, 12)
    assert layout.owner(torch.tensor([0, 3, 4, 11, 12, 20, -1])).tolist() == [0, 0, 1, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="multiple of the expert-parallel group size"):
        ExpertLayout(10, 3)


def test_route_rows_once_per_rank_with_local_ids():
    layout = ExpertLayout(8, 2)  # rank 0: 0-3, rank 1: 4-7; 8, 9 zero experts
    ids = torch.tensor([[1, 2, 8], [5, 9, 0], [8, 9, 8], [6, 7, 4]])
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]])
    r = route(layout, ids, w)
    assert r.send_splits == [2, 2] and r.token_index.tolist() == [0, 1, 1, 3] and r.ffn_slots == 7
    assert r.local_ids.tolist() == [[1, 2, -1], [-1, -1, 0], [1, -1, -1], [2, 3, 0]]
    assert r.weights.tolist() == [[1, 2, 0], [0, 0, 6], [4, 0, 0], [10, 11, 12]]


@pytest.mark.parametrize("dtypes", [(torch.float16, 7), (torch.float64, 3), (torch.bfloat16, 1), (torch.int32, 5)])
def test_row_format_aligned_and_exact(dtypes):
    dtype, width = dtypes
    fields = [torch.randn(5, width).to(dtype), torch.rand(5, 3), torch.arange(10, dtype=torch.int64).reshape(5, 2)]
    packed, fmt = pack_rows(fields)
    assert packed.dtype == torch.uint8 and fmt.row_bytes % max(4, dtype.itemsize, 8) == 0
    for got, want in zip(unpack_rows(packed, fmt), fields):
        assert bits_equal(got, want)
    layout = RowFormat.of([(torch.float16, 3), (torch.float32, 1)])  # the wider field goes first
    assert layout.fields == ((torch.float16, 3, 4), (torch.float32, 1, 0)) and layout.row_bytes == 12


def test_single_rank_group_and_input_checks():
    disp = ExpertParallelDispatcher(LocalCommunicator(), 4)
    c = case("local", 1, 4, 2, 3, 8, 9)
    x, ids, w = inputs(c, 0, 1)
    inp = disp.dispatch(x, ids, w)
    assert inp.slots_per_expert().sum() == int((ids < 4).sum())
    out = disp.combine(inp, expert_side(c, 0, 1, inp))
    assert bits_equal(out, reference_moe(x, ids, w, 4, scale_expert))
    assert disp.last_stats.rows_to_peers == 0 and disp.last_stats.bytes_to_peers == 0
    with pytest.raises(ValueError, match="topk_weights"):
        disp.dispatch(x, ids, w[:, :2])
    with pytest.raises(ValueError, match="one row per received row"):
        disp.combine(inp, out[:0])
