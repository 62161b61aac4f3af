"""The analytic cost of each part of one layer, for a decoding step or a prefill chunk on one device.

Each compute part has matmul FLOPs, the bytes its matmuls and attention move (weights, KV cache,
their inputs and outputs), the bytes its elementwise operators move, and operator launches; its time is

    max(FLOPs / achieved FLOP/s, bytes / achieved memory bandwidth)
      + elementwise bytes / achieved memory bandwidth + launches x op_overhead_us,

the roofline of its matmuls plus the passes that run as kernels of their own (norms, rotary,
SwiGLU's product, residuals, layout copies: small beside the weights on an accelerator, not on a
CPU), plus the launches where the host pays for each (op_overhead_us, 0 on a device whose
launches run ahead of its kernels).

Each communication part has link bytes and messages; its time is messages x latency + bytes /
achieved link bandwidth. The parts are the runtime's steps (model/layer.py):

- attn0, attn1_qkv, attn1_core (LongCat-Flash) or attn (DeepSeek-V3): MLA. The projections are
  q_a, kv_a (with the rope key) and q_b; the core is, for a decoding step, attention in the
  latent space (kv_b folded into the query and the output, reading each sequence's cached latent
  and rope key), for a prefill chunk kv_b expanding every key and a causal attention over the
  prompt; then o_proj. attn0 is a whole sublayer; attention 1 is split where the schedule splits it.
- ffn0, ffn1: the dense SwiGLU FFNs; shared (DeepSeek-V3): the shared expert, a SwiGLU of its width.
- router: the float32 classifier over every expert (FFN and zero), plus the dispatch's local packing.
- experts: the FFN experts on the slots this device receives, plus unpacking what arrived and the
  combine's local part. A device receives, on average, as many slots as it sends: tokens x FFN
  experts per token; it reads the weights of the experts those slots reach (of its N / ep, each
  reached with probability 1 - (1 - 1/N)^(slots of all devices)).
- dispatch, combine: a token goes to each other device that holds one of its FFN experts once
  (moeport's dispatch, and DeepEP's normal mode); with its FFN slots spread evenly over the ep
  devices, it leaves for (ep - 1) x (1 - (1 - 1/ep)^k) of them (k: FFN experts per token), 7.72 for
  k = 8 at ep 128. A dispatched row is the hidden state in the dispatch dtype, a weight and an id
  (4 bytes each) per top-k slot, and for float8 one float32 scale per 128 channels (DeepEP's
  per-token groups); a combined row is the hidden state in the combine dtype. A prefill's
  dispatch sends the row counts first (two messages: the normal mode); a decoding step's sends
  fixed blocks with no counts (one: the low-latency mode); a combine is one message.
"""

from __future__ import annotations

import dataclasses
import math

from moeport.plan.architectures import Architecture
from moeport.plan.hardware import PLAN_DTYPES, HardwareSpec

#: Operators moeport's layer launches per part (decoding step, prefill), counted at torch's dispatcher
#: (a TorchDispatchMode, views included) on the small preset over 2 ranks; they matter where each launch
#: costs host time (CPUs: op_overhead_us), not on a device whose launches run ahead of its kernels.
OPS: dict[str, tuple[float, float]] = {
    "attn0": (70, 69),  # input norm, projections, rope, core attention, o_proj, residual, post-attention norm
    "attn1_qkv": (36, 36),  # input norm, projections, rope
    "attn1_core": (29, 28),  # cache write, core attention, o_proj, residual
    "ffn0": (12, 12),
    "ffn1": (16, 16),  # with its norm
    "router": (13, 13),
    "experts": (12, 12.5),  # the experts' kernel and the layer's final sum
    "head": (15, 14),  # per forward: embedding, rotation, final norm, lm_head, next-token choice
}
#: The expert exchange's local operators (ep > 1): packing before the dispatch (counted with the
#: router), unpacking, the combine's issue and its postprocess (counted with the experts).
EXCHANGE_OPS: dict[str, tuple[float, float]] = {"router": (65, 45), "experts": (30, 20)}


@dataclasses.dataclass(frozen=True)
class Work:
    """What one part costs before hardware: matmul FLOPs (in the weight dtype; `act_flops` attention's in
    the activation dtype), the bytes its matmuls move (weights, KV cache, their inputs and outputs), the
    bytes its elementwise operators move (norms, rotary, activations, residuals, copies: each a pass of
    its own), operator launches, and for a communication its link bytes and messages."""

    flops: float = 0.0
    bytes: float = 0.0
    elem_bytes: float = 0.0
    ops: float = 0.0
    link_bytes: float = 0.0
    messages: int = 0
    act_flops: float = 0.0


@dataclasses.dataclass(frozen=True)
class Workload:
    """The tokens one device runs in one forward of a phase: `tokens` = `sequences` x `new` positions,
    each sequence attending to `past` cached positions before its new ones."""

    phase: str  # "decode" or "prefill"
    tokens: float
    sequences: float
    new: float
    past: float
    ep: int
    ffn_experts_per_token: float
    weight_dtype: str
    dispatch_dtype: str
    combine_dtype: str

    @property
    def decoding(self) -> bool:
        """One new position per sequence after a cache."""
        return self.phase == "decode"

    @property
    def w(self) -> int:
        """Bytes per weight."""
        return PLAN_DTYPES[self.weight_dtype]

    @property
    def act_dtype(self) -> str:
        """The activations' and KV cache's dtype: the weights', or bfloat16 under float8 weights."""
        return "bfloat16" if self.weight_dtype == "float8" else self.weight_dtype

    @property
    def a(self) -> int:
        """Bytes per activation / cache element."""
        return PLAN_DTYPES[self.act_dtype]

    def split(self, parts: int) -> Workload:
        """One of `parts` equal micro-batches of this workload (fractional sizes allowed: costs are linear)."""
        return dataclasses.replace(self, tokens=self.tokens / parts, sequences=self.sequences / parts)


def decode_workload(batch: int, context: int, **rest) -> Workload:
    """A decoding step: `batch` sequences, one new position each, `context` positions cached."""
    return Workload("decode", float(batch), float(batch), 1.0, float(context), **rest)


def prefill_workload(tokens: int, context: int, **rest) -> Workload:
    """A prefill chunk of `tokens`: whole prompts of `context` tokens when it holds at least one (causal
    attention within each), else the last `tokens` positions of one prompt of `context`."""
    if tokens >= context:
        return Workload("prefill", float(tokens), tokens / context, float(context), 0.0, **rest)
    return Workload("prefill", float(tokens), 1.0, float(tokens), float(context - tokens), **rest)


def _matmul(rows: float, params: float, wl: Workload, inputs: float, outputs: float) -> Work:
    """`rows` through a weight of `params` elements: FLOPs, the weight read, inputs read and outputs written."""
    return Work(flops=2 * rows * params, bytes=params * wl.w + rows * (inputs + outputs) * wl.a)


def _elementwise(elements: float, wl: Workload) -> Work:
    """Elementwise passes over `elements` activation elements in all (read and written)."""
    return Work(elem_bytes=elements * wl.a)


def _plus(*works: Work, ops: float = 0.0) -> Work:
    return Work(*(sum(getattr(w, f.name) for w in works) for f in dataclasses.fields(Work)))


def _ops(part: str, wl: Workload) -> float:
    return OPS[part][0 if wl.decoding else 1]


def norm_elements(n: int) -> int:
    """Elements an RMSNorm of width n moves per token: its norm reads n, its scaling reads n and writes n;
    a residual add moves as many."""
    return 3 * n


def mla_projection(m: Architecture, wl: Workload) -> Work:
    """The input norm, q_a, kv_a (latent and rope key), their norms, q_b and the rotation of `wl.tokens` tokens."""
    h, t = m.hidden, wl.tokens
    a_proj = _matmul(t, h * (m.q_lora + m.kv_lora + m.rope), wl, h, m.q_lora + m.kv_lora + m.rope)
    q_b = _matmul(t, m.q_lora * m.heads * (m.nope + m.rope), wl, m.q_lora, m.heads * (m.nope + m.rope))
    rotary = 8 * (m.heads + 1) * m.rope  # the rope parts gathered, swapped, multiplied twice and added
    norms = norm_elements(h) + norm_elements(m.q_lora) + norm_elements(m.kv_lora)
    return _plus(a_proj, q_b, _elementwise(t * (norms + rotary), wl))


def mla_core(m: Architecture, wl: Workload) -> Work:
    """Core attention, o_proj and the residual: latent-space attention for a decoding step (kv_b folded into
    the query and the output, each sequence's cache read), expanded keys and causal attention for a prefill."""
    t, latent = wl.tokens, m.kv_lora + m.rope
    keys = wl.past + wl.new  # per sequence
    cache = wl.sequences * wl.past * latent * wl.a + t * latent * wl.a  # read what is cached, write the new
    o_proj = _matmul(t, m.heads * m.v * m.hidden, wl, m.heads * m.v, m.hidden)
    kv_b = m.kv_lora * m.heads * (m.nope + m.v)
    out_layout = 2 * m.heads * m.v + norm_elements(m.hidden)  # heads back to rows, the residual
    if wl.decoding:
        absorb = _matmul(t, kv_b, wl, m.heads * (m.nope + m.kv_lora), m.heads * (m.kv_lora + m.v))
        scores = Work(act_flops=2 * t * m.heads * keys * (latent + m.kv_lora))
        layout = _elementwise(t * (2 * m.heads * latent + out_layout), wl)
        return _plus(absorb, scores, o_proj, Work(bytes=cache), layout)
    expand = _matmul(wl.sequences * keys, kv_b, wl, m.kv_lora, m.heads * (m.nope + m.v))
    pairs = wl.sequences * (wl.new * wl.past + wl.new * (wl.new + 1) / 2)  # causal (query, key) pairs
    qk = m.nope + m.rope
    scores = Work(act_flops=2 * pairs * m.heads * (qk + m.v), bytes=t * m.heads * (qk + m.v) * wl.a)
    layout = _elementwise(t * (2 * m.heads * qk + out_layout) + wl.sequences * keys * 2 * m.heads * qk, wl)
    return _plus(expand, scores, o_proj, Work(bytes=cache), layout)


def swiglu(m: Architecture, wl: Workload, width: int) -> Work:
    """A SwiGLU FFN of intermediate `width` on every token (gate and up, silu and product, down), and one
    norm or residual of its input's width."""
    elements = wl.tokens * (5 * width + norm_elements(m.hidden))
    gate_up = _matmul(wl.tokens, 2 * m.hidden * width, wl, m.hidden, 2 * width)
    down = _matmul(wl.tokens, width * m.hidden, wl, width, m.hidden)
    return _plus(gate_up, down, _elementwise(elements, wl))


def router(m: Architecture, wl: Workload) -> Work:
    """The float32 classifier over every expert, FFN and zero, its softmax and top-k, and the zero experts'
    share of the output (computed where the token lives)."""
    outputs = m.experts + m.zero_experts
    return Work(flops=2 * wl.tokens * m.hidden * outputs,
                bytes=4 * m.hidden * outputs + wl.tokens * (m.hidden * wl.a + 4 * outputs),
                elem_bytes=wl.tokens * (12 * outputs + norm_elements(m.hidden) * wl.a))


def slots_per_device(wl: Workload) -> float:
    """FFN-expert slots one device receives: on average what it sends, tokens x FFN experts per token."""
    return wl.tokens * wl.ffn_experts_per_token


def experts_reached(m: Architecture, wl: Workload) -> float:
    """How many of this device's N / ep experts the slots of all ep devices reach, on average."""
    every_slot = slots_per_device(wl) * wl.ep
    return m.experts / wl.ep * (1.0 - (1.0 - 1.0 / m.experts) ** every_slot)


def experts(m: Architecture, wl: Workload) -> Work:
    """The FFN experts on this device's slots: their FLOPs and the weights of the experts reached."""
    slots, params = slots_per_device(wl), 3 * m.hidden * m.expert_ffn
    activations = slots * (2 * m.hidden + 3 * m.expert_ffn) * wl.a
    gather_sum = (2 * slots + 4 * wl.tokens) * m.hidden  # rows gathered and summed per token, the layer's sum
    return Work(flops=2 * slots * params, bytes=experts_reached(m, wl) * params * wl.w + activations,
                elem_bytes=gather_sum * wl.a)


def rows_leaving(wl: Workload) -> float:
    """Hidden rows a device sends per exchange: each token once to each other device it has FFN slots on."""
    if wl.ep == 1:
        return 0.0
    return wl.tokens * (wl.ep - 1) * (1.0 - (1.0 - 1.0 / wl.ep) ** wl.ffn_experts_per_token)


def dispatch(m: Architecture, wl: Workload) -> Work:
    """The dispatch's link bytes and messages (none when one device holds every expert)."""
    row = m.hidden * PLAN_DTYPES[wl.dispatch_dtype] + 8 * m.top_k
    if wl.dispatch_dtype == "float8":
        row += 4 * math.ceil(m.hidden / 128)
    messages = 0 if wl.ep == 1 else (1 if wl.decoding else 2)
    return Work(link_bytes=rows_leaving(wl) * row, messages=messages)


def combine(m: Architecture, wl: Workload) -> Work:
    """The combine's link bytes and messages: the expert outputs back, one row per dispatched row."""
    return Work(link_bytes=rows_leaving(wl) * m.hidden * PLAN_DTYPES[wl.combine_dtype], messages=int(wl.ep > 1))


def head_rows(wl: Workload) -> float:
    """Positions whose logits a forward computes: every token of a decoding step, the last of each prompt."""
    return wl.tokens if wl.decoding else max(1.0, wl.sequences)


def head(m: Architecture, wl: Workload) -> Work:
    """Per forward: the embedding lookup, the final norm and lm_head on the positions that need logits."""
    lm_head = _matmul(head_rows(wl), m.vocab * m.hidden, wl, m.hidden, m.vocab)
    lookup = _elementwise(wl.tokens * 2 * m.hidden + head_rows(wl) * norm_elements(m.hidden), wl)
    return dataclasses.replace(_plus(lm_head, lookup), ops=_ops("head", wl))


def layer_parts(m: Architecture, wl: Workload) -> dict[str, Work]:
    """Every part of one MoE layer (the runtime's step names), with its operator launches."""
    exchange = wl.ep > 1

    def with_ops(part: str, work: Work, ops_of: str | None = None) -> Work:
        ops = _ops(ops_of or part, wl)
        if exchange and (ops_of or part) in EXCHANGE_OPS:
            ops += EXCHANGE_OPS[ops_of or part][0 if wl.decoding else 1]
        return dataclasses.replace(work, ops=ops)

    core = mla_core(m, wl)
    post_norm = _elementwise(wl.tokens * norm_elements(m.hidden), wl)  # the post-attention norm (MoE input)
    common = {
        "router": with_ops("router", router(m, wl)),
        "dispatch": dispatch(m, wl),
        "experts": with_ops("experts", experts(m, wl)),
        "combine": combine(m, wl),
    }
    if m.layout == "scmoe":
        return {
            "attn0": with_ops("attn0", _plus(mla_projection(m, wl), core, post_norm)),
            "ffn0": with_ops("ffn0", swiglu(m, wl, m.dense_ffn)),
            "attn1_qkv": with_ops("attn1_qkv", mla_projection(m, wl)),
            "attn1_core": with_ops("attn1_core", core),
            "ffn1": with_ops("ffn1", swiglu(m, wl, m.dense_ffn)),
            **common,
        }
    return {
        "attn": with_ops("attn", _plus(mla_projection(m, wl), core, post_norm), "attn0"),
        "shared": with_ops("shared", swiglu(m, wl, m.shared_experts * m.expert_ffn), "ffn0"),
        **common,
    }


def dense_layer_parts(m: Architecture, wl: Workload) -> dict[str, Work]:
    """A layer without MoE (DeepSeek-V3's first layers): MLA then a dense FFN."""
    post_norm = _elementwise(wl.tokens * norm_elements(m.hidden), wl)
    return {
        "attn": dataclasses.replace(_plus(mla_projection(m, wl), mla_core(m, wl), post_norm), ops=_ops("attn0", wl)),
        "ffn": dataclasses.replace(swiglu(m, wl, m.dense_ffn), ops=_ops("ffn0", wl)),
    }


@dataclasses.dataclass(frozen=True)
class Timed:
    """A part's time on a device (seconds) and what bounds it: compute, memory, link or overhead."""

    seconds: float
    bound: str


def time_of(work: Work, hw: HardwareSpec, wl: Workload, where: str = "plan.weight_dtype") -> Timed:
    """A part's time on `hw`: a communication's from its link bytes and messages, else the compute formula."""
    if work.messages or work.link_bytes:
        return Timed(work.messages * hw.link_latency_us * 1e-6 + work.link_bytes / hw.link_bytes_per_s, "link")
    compute = work.flops / hw.flops_per_s(wl.weight_dtype, where) if work.flops else 0.0
    if work.act_flops:
        compute += work.act_flops / hw.flops_per_s(wl.act_dtype, where)
    memory = work.bytes / hw.memory_bytes_per_s
    elementwise = work.elem_bytes / hw.memory_bytes_per_s
    overhead = work.ops * hw.op_overhead_us * 1e-6
    terms = [(compute, "compute"), (memory, "memory"), (elementwise, "elementwise"), (overhead, "overhead")]
    return Timed(max(compute, memory) + elementwise + overhead, max(terms)[1])


__all__ = [
    "EXCHANGE_OPS",
    "OPS",
    "Timed",
    "Work",
    "Workload",
    "combine",
    "decode_workload",
    "dense_layer_parts",
    "dispatch",
    "experts",
    "experts_reached",
    "head",
    "layer_parts",
    "mla_core",
    "mla_projection",
    "prefill_workload",
    "router",
    "rows_leaving",
    "slots_per_device",
    "swiglu",
    "time_of",
]
