"""What LongCat-Flash trains on besides the next token, and how its router is held to a compute budget.

Each term is written as one rank's share of a sum over the global batch: a rank passes
its own tokens and the global token count T (and, for the balance loss, the slot
counts all-reduced over the ranks), and the ranks' shares add up to the loss of the
whole batch. So the gradients, summed over the ranks, are those of one process
holding the whole batch, at any world size.

- Device-level balance loss (the LongCat-Flash report): the N FFN experts split into D
  contiguous groups, the zero experts one more group;
      L_LB = alpha * sum_j f_j * P_j,   P_j = (1/T) sum_t sum_{i in G_j} R(x_t)_i,
      f_j = D / (K_e T) * (slots in G_j) for the FFN groups,
      f_{D+1} = 1 / ((K - K_e) T) * (zero-expert slots),
  R the router's softmax scores, K the top-k, K_e the target FFN experts per token. The
  report writes each f_j's count as "t selects G_j" summed over tokens; it is counted
  here in slots, which its normalisation implies (each f_j is 1 when the routing is
  balanced at the target). f is a count: no gradient flows through it.
- Hidden z-loss: (lambda / T) * sum_t (log sum_i exp |h_t,i|)^2 over a layer's output
  hidden states h, against massive activations.
- Compute-budget controller: after each step, for every FFN expert i,
      delta b_i = mu * (K_e / (K N) - T_i / (K T_all)),
  T_i its slots and T_all the tokens of the global batch; zero experts' biases stay. It
  moves e_score_correction_bias (float32, outside the optimizer), so the controller's
  state is saved with the checkpoint.
"""

from __future__ import annotations

import torch


def expert_groups(n_routed_experts: int, n_zero_experts: int, groups: int, device: torch.device) -> torch.Tensor:
    """The balance-loss group of each expert id [N + Z]: FFN expert i in group i * D // N, every zero expert in
    group D."""
    ffn = torch.arange(n_routed_experts, device=device) * groups // n_routed_experts
    return torch.cat([ffn, torch.full((n_zero_experts,), groups, dtype=torch.int64, device=device)])


def group_counts(expert_slots: torch.Tensor, group_of: torch.Tensor, groups: int) -> torch.Tensor:
    """Slots per group [D + 1] (float32) from slots per expert [N + Z]."""
    counts = torch.zeros(groups + 1, dtype=torch.float32, device=expert_slots.device)
    return counts.index_add(0, group_of, expert_slots.to(torch.float32))


def group_slot_counts(ids: torch.Tensor, group_of: torch.Tensor, groups: int) -> torch.Tensor:
    """Slots per group [D + 1] of routed ids [T, k] (float32, to be all-reduced over the ranks)."""
    return group_counts(torch.bincount(ids.reshape(-1), minlength=group_of.numel()), group_of, groups)


def balance_loss(scores: torch.Tensor, group_of: torch.Tensor, counts: torch.Tensor, groups: int,
                 ffn_per_token: float, top_k: int, total_tokens: int, coefficient: float) -> torch.Tensor:
    """This rank's share of the device-level balance loss: scores [T_here, N + Z] (the router's softmax),
    counts [D + 1] the global slots per group, total_tokens the global T."""
    t = float(total_tokens)
    f = counts.to(torch.float32).clone()
    f[:groups] *= groups / (ffn_per_token * t)
    f[groups] *= 1.0 / ((top_k - ffn_per_token) * t) if top_k > ffn_per_token else 0.0
    mass = torch.zeros(groups + 1, dtype=torch.float32, device=scores.device)
    mass = mass.index_add(0, group_of, scores.to(torch.float32).sum(dim=0))  # sum_t sum_{i in G_j} R_i
    return coefficient * (f.detach() * mass).sum() / t


def hidden_z_loss(hidden: torch.Tensor, total_tokens: int, coefficient: float) -> torch.Tensor:
    """This rank's share of the hidden z-loss of hidden states [..., H] (its tokens), over the global T."""
    z = torch.logsumexp(hidden.to(torch.float32).abs(), dim=-1)
    return coefficient * z.square().sum() / float(total_tokens)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """This rank's share of the mean next-token cross entropy over the global T: logits [B, S, V], targets [B, S]."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(torch.float32),
                                             targets.reshape(-1), reduction="sum") / float(total_tokens)


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, ffn_slots: torch.Tensor, total_tokens: int, ffn_per_token: float,
                       top_k: int, rate: float) -> None:
    """The compute-budget controller's step on a router's e_score_correction_bias [N + Z], in place: ffn_slots [N]
    the global slots of each FFN expert, total_tokens the global batch's tokens, rate mu."""
    n = ffn_slots.numel()
    target = ffn_per_token / (top_k * n)
    share = ffn_slots.to(torch.float32) / (top_k * float(total_tokens))
    bias[:n] += rate * (target - share).to(bias.dtype)
