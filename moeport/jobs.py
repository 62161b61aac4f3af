"""What the commands run on each rank, and how the ranks are started for them.

`run_on_ranks` starts the job the way the environment asks: in this process when
torchrun or mpiexec started it (each rank runs its own share) or when one rank is
enough, on spawned local processes otherwise (under mpiexec for the MPI library).
Either way the job's results reach one process: the launcher of spawned ranks,
or rank 0 of ranks an outside launcher started (`gather_on_rank0`).
"""

from __future__ import annotations

import pickle
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from moeport.base.errors import UserError
from moeport.launch import detect_rank_env, spawn
from moeport.launch.failures import error_report, failure_from_report
from moeport.model.timeline import Span, Timeline, summarize
from moeport.profile import Profile, model_config_of
from moeport.runtime import Runtime


def run_in_runtime(profile: Profile, fn: Callable[..., Any], args: Sequence[Any], requested: int | None = None) -> Any:
    """Start this rank's Runtime, run `fn(runtime, *args)`, close the Runtime."""
    with Runtime.start(profile, requested_world_size=requested) as rt:
        return fn(rt, *args)


def gather_on_rank0(rt: Runtime, value: Any) -> list[Any] | None:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the others.

    A collective over the Runtime's world communicator: every rank calls it at
    the same point. Each value travels pickled, as uint8 rows padded to the
    longest; rank 0's own value does not travel.
    """
    payload = b"" if rt.rank == 0 else pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    sizes = _gather_sizes(rt, len(payload))
    most = max(sizes)
    everything = _gather_bytes(rt, payload, most)
    if rt.rank != 0:
        return None
    others = [pickle.loads(everything[r * most: r * most + sizes[r]]) for r in range(1, rt.world_size)]
    return [value, *others]


def _gather_sizes(rt: Runtime, size: int) -> list[int]:
    """Every rank's payload size in bytes, in rank order, on every rank."""
    mine = torch.tensor([size], dtype=torch.int64, device=rt.device)
    return [int(n) for n in rt.comm.all_gather(mine).cpu().tolist()]


def _gather_bytes(rt: Runtime, payload: bytes, most: int) -> bytes:
    """Every rank's payload padded to `most` bytes, concatenated in rank order (nothing travels when `most` is 0)."""
    if most == 0:
        return b""
    padded = torch.zeros(most, dtype=torch.uint8)
    if payload:
        padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return rt.comm.all_gather(padded.to(rt.device)).cpu().numpy().tobytes()


def run_and_gather(rt: Runtime, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """`fn(rt, *args)` on this rank, then every rank's result on rank 0 (in rank order); [] on the others.

    What each rank of a torchrun / mpiexec job runs, so that one process holds the whole job's results.
    """
    gathered = gather_on_rank0(rt, fn(rt, *args))
    return [] if gathered is None else gathered


def launched_profile(profile: Profile) -> Profile:
    """`profile` with the world size of the ranks torchrun / mpiexec started, as the job ran it; unchanged otherwise.

    For reports written after `run_on_ranks`, whose ranks took the launcher's world size.
    """
    env = detect_rank_env()
    if env.launcher in ("torchrun", "mpiexec"):
        return profile.with_world_size(env.world_size)
    return profile


def start_ranks(
    fn: Callable[..., Any], args: Sequence[Any], profile: Profile, timeout_s: float | None = None
) -> list[Any]:
    """Start `profile.world_size` new local ranks (under mpiexec for the MPI library) running `fn(runtime, *args)`."""
    from moeport.launch import spawn_mpiexec

    start = spawn_mpiexec if profile.collectives.library == "mpi" else spawn
    return start(run_in_runtime, (profile, fn, tuple(args)), profile.world_size, timeout_s=timeout_s)


def run_on_ranks(
    fn: Callable[..., Any], args: Sequence[Any], profile: Profile, requested_world_size: int | None = None,
    timeout_s: float | None = None,
) -> list[Any]:
    """Run `fn(runtime, *args)` on every rank; returns every rank's result, in rank order, to one process.

    For spawned ranks (or one rank) that is this process. Under torchrun / mpiexec it
    is rank 0, which gathers them over the job's communicator; the other ranks get [].
    """
    env = detect_rank_env()
    if env.launcher in ("torchrun", "mpiexec"):
        try:
            return run_in_runtime(profile, run_and_gather, (fn, *args), requested_world_size)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:  # this rank noticed the failure: one line naming it, exit 1
            raise failure_from_report(env.rank, error_report(exc)) from exc
    if profile.world_size == 1:
        return [run_in_runtime(profile, fn, args)]
    return start_ranks(fn, args, profile, timeout_s)


def build_model(rt: Runtime, init_std: dict[str, float] | None = None) -> Any:
    """This rank's model: the profile's checkpoint, or its preset with seeded random weights (each parameter
    group's std times its `init_std` multiplier, where given)."""
    from moeport.model import LongcatForCausalLM, load_pretrained
    from moeport.model.init import init_weights

    kind, value = rt.profile.model_source()
    if kind == "checkpoint":
        return load_pretrained(value, rt)
    config, _ = model_config_of(rt.profile)
    model = init_weights(LongcatForCausalLM(config, rt), rt.profile.seed, init_std)
    return model.place(rt.device, rt.dtype).eval()


def my_rows(total: int, rank: int, world: int) -> slice:
    """The batch rows a rank takes under data-parallel attention (as even as possible, in order)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def gather_rows(rt: Runtime, mine: torch.Tensor, total: int) -> torch.Tensor | None:
    """Every rank's rows of a batch, in order, on rank 0 (None elsewhere)."""
    world = rt.world_size
    most = max(my_rows(total, r, world).stop - my_rows(total, r, world).start for r in range(world))
    padded = mine.new_zeros((most, *mine.shape[1:]))
    padded[: mine.shape[0]] = mine
    everything = rt.comm.all_gather(padded.contiguous())
    if rt.rank != 0:
        return None
    parts = [everything[r * most: r * most + (my_rows(total, r, world).stop - my_rows(total, r, world).start)] for r in range(world)]
    return torch.cat(parts)


def check_tokens(tokens: np.ndarray, vocab_size: int, source: str) -> torch.Tensor:
    """Token ids [B, T] as int64, or a UserError naming the file and the bad value."""
    if tokens.ndim != 2:
        raise UserError(f"{source}: token ids must have shape [batch, length], got {list(tokens.shape)}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"{source}: token ids must be integers, got {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens.min() if tokens.min() < 0 else tokens.max()
        raise UserError(f"{source}: token id {int(bad)} is outside the vocabulary [0, {vocab_size})")
    return torch.from_numpy(tokens.astype(np.int64))


def forward_job(rt: Runtime, tokens: np.ndarray) -> np.ndarray | None:
    """Logits [B, T, vocab] (float32) for all ranks' rows, returned on rank 0."""
    model = build_model(rt)
    ids = tokens[my_rows(tokens.shape[0], rt.rank, rt.world_size)]
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).to(torch.float32)
    full = gather_rows(rt, logits, tokens.shape[0])
    return None if full is None else full.cpu().numpy()


def generated_part(new_ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """A sequence's generated tokens: `new_ids` (what generate appended to its row) up to and including its first
    stop token, all of them where it has none (the pad fill after a stop is dropped)."""
    stops = set(stop_ids)
    tokens = [int(t) for t in new_ids]
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[: index + 1]
    return tokens


def generate_job(rt: Runtime, prompts: Sequence[Sequence[int]], new_tokens: int, sampling: dict[str, Any],
                 eos_ids: Sequence[int], pad_id: int) -> list[list[int]]:
    """This rank's share of `prompts` (`my_rows`; a list of id lists, or an array [B, T]) decoded: each one's
    generated tokens, in order, up to and including its first stop token in `eos_ids` (empty: never stop).

    The rank left-pads its own prompts into one batch with an attention mask (none when they are all as long) and
    fills stopped sequences with `pad_id`; every rank returns its own rows, whatever their padded width.
    """
    from moeport.model.generation import left_pad

    model = build_model(rt)
    mine = prompts[my_rows(len(prompts), rt.rank, rt.world_size)]
    ids, mask = left_pad(mine, pad_id)
    out = model.generate(ids, max_new_tokens=new_tokens, attention_mask=mask, eos_token_id=list(eos_ids),
                         pad_token_id=pad_id, **sampling)
    return [generated_part(row, eos_ids) for row in out[:, ids.shape[1]:].cpu().tolist()]


#: The phases of the main job, in the order it runs them: one prefill forward, then decode steps.
PHASES = ("prefill", "decode")


class PhaseTimeline(Timeline):
    """A Timeline whose spans also say the phase ("prefill" / "decode") and the step of it they belong to.

    Used by `run_job` and benchmarks/overlap.py, which set `phase` and `step` before each forward;
    `tagged_spans()` then gives (Span, phase, step) per span, in the order they were recorded.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.phase = PHASES[0]
        self.step = 0
        self._tags: list[tuple[str, int]] = []
        super().__init__(*args, **kwargs)

    def add(self, name: str, track: str, start: Any, end: Any, *blocked: Any) -> None:
        """Timeline.add, remembering the phase and step current now."""
        super().add(name, track, start, end, *blocked)
        self._tags.append((self.phase, self.step))

    def tagged_spans(self) -> list[tuple[Span, str, int]]:
        """(Span, phase, step) of every interval recorded so far, in the order recorded."""
        return [(span, phase, step) for span, (phase, step) in zip(self.spans(), self._tags)]


def span_dicts(tagged: list[tuple[Span, str, int]]) -> list[dict[str, Any]]:
    """Spans as the reports take them: Span's fields, with `phase` and `step`."""
    return [{**vars(span), "phase": phase, "step": step} for span, phase, step in tagged]


def run_job(rt: Runtime, iterations: int, batch: int, prompt: int) -> dict[str, Any]:
    """The main job on one rank: a prefill of `batch` x `prompt` tokens, then `iterations` decode steps.

    Returns this rank's timings, its timeline summary (over the whole run, and per phase under
    "phases"), its spans (each tagged with its phase and step: the prefill is step 0, the decode
    steps 0 .. iterations - 1), and its routing counts.
    """
    model = build_model(rt)
    config = model.config
    generator = torch.Generator().manual_seed(rt.profile.seed * 7919 + rt.rank)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=generator)
    counts = torch.zeros(config.num_experts_total, dtype=torch.int64)
    for layer in model.model.layers:
        layer.routing_counts = counts
    with torch.no_grad():
        model(ids[:, : min(4, prompt)])  # warm-up: first calls allocate buffers and pick kernels
        counts.zero_()
        caches = model.new_caches(batch, prompt + iterations)
        rt.comm.barrier()
        timeline = model.timeline = PhaseTimeline.for_backend(rt.backend)
        started = time.perf_counter()
        logits = model(ids, caches, logits_to_keep=1)[:, -1]
        rt.backend.synchronize()
        prefill_s = time.perf_counter() - started
        timeline.phase = "decode"
        step_times = []
        for step in range(iterations):
            timeline.step = step
            step_start = time.perf_counter()
            logits = model(logits.argmax(-1, keepdim=True), caches, logits_to_keep=1)[:, -1]
            rt.backend.synchronize()
            step_times.append(time.perf_counter() - step_start)
        total_s = time.perf_counter() - started
        tagged = timeline.tagged_spans()
        model.timeline = None
    return {
        "rank": rt.rank,
        "prefill_seconds": prefill_s,
        "decode_seconds": sum(step_times),
        "step_seconds": float(np.median(step_times)) if step_times else 0.0,
        "total_seconds": total_s,
        "tokens": batch * (prompt + iterations),
        "generated_tokens": batch * iterations,
        "expert_counts": counts.tolist(),
        "n_routed_experts": config.n_routed_experts,
        "timeline": summarize([span for span, _, _ in tagged]),
        "phases": {phase: summarize([span for span, p, _ in tagged if p == phase]) for phase in PHASES},
        "spans": span_dicts(tagged),
    }
