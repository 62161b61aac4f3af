"""Kernels for the MoE's FFN experts, beyond torch's own operators, that a device may offer.

The contract every kernel here keeps is the experts' weight layout, as the model holds it:

- the E FFN experts a rank holds are stacked: gate_up [E, H, 2I] (for each expert, the
  gate columns, then the up columns, laid out for `rows @ gate_up[e]`) and down [E, I, H];
  expert e of a rank is the model's expert `first + e`;
- the rows to compute are x [N, H]; each row has k slots: local expert ids [N, k] (int64,
  -1 for a slot that is not for an expert of this rank) and weights [N, k] (float32);
- the experts' output for row n is the sum over its slots with a local id e >= 0, in slot
  order, of weights[n, s] * (silu(x[n] @ gate) * (x[n] @ up)) @ down[e].

Two kinds of kernel, each optional:

- "fused_experts": the whole layer in one call,
  `kernel(x, local_ids, weights, gate_up, down, results, out)` writes the output into `out`
  [N, H] and returns it; `results` [N * k, H] is scratch it may use.
- "grouped_matmul": the experts' GEMMs with no padding, `kernel(a, b, sizes, out)` writes,
  for each group g, the next `sizes[g]` rows of `a` [S, K] times `b[g]` [K, N] into the same
  rows of `out` [S, N] (empty groups allowed) and returns `out`.

A kernel that cannot take a dtype raises NotImplementedError. A Backend offers its device's
kernels in its class attribute `expert_kernels` ({kind: "package.module:factory"}); the
factory returns the kernel, or None where it cannot run on this machine. `OfferedKernels`
(offered.py) checks each once per dtype against the definition (checks.py) before the
model uses it. What moeport ships: the CPU's fused experts (cpu_fused_experts.py, a
torch.library operator built with torch.utils.cpp_extension) and MKL's grouped matmul
(mkl_grouped_matmul.py, no compiler needed), offered by the CPU backend as HOST_CPU.
This package imports only torch and moeport's base layer.
"""

#: The kinds of kernel a device may offer the experts.
KINDS = ("fused_experts", "grouped_matmul")

#: The kernels moeport ships for the host CPU: what the CPU backend offers, and what a model
#: built without a Runtime (one process, on the CPU) uses.
HOST_CPU = {
    "fused_experts": "moeport.kernels.cpu_fused_experts:fused_experts",
    "grouped_matmul": "moeport.kernels.mkl_grouped_matmul:grouped_matmul",
}
