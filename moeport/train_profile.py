"""The profile's `train:` section, validated like the rest of the profile, and what `moeport train` makes of it."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moeport.base.errors import UserError
from moeport.model.training import TrainSettings, group_multipliers
from moeport.model.transfer import WidthTransfer, width_transfer

#: K_e's default as a share of the top-k: LongCat-Flash activates about 8 of its 12 slots' FFN experts per token.
DEFAULT_FFN_SHARE = 8 / 12


def _check_groups(value: dict[str, float]) -> dict[str, float]:
    """Only known parameter groups, each with a multiplier of 0 or more (as given)."""
    group_multipliers(value)
    return value


class WidthTransferSection(BaseModel):
    """`train.width_transfer`: train this model with the hyperparameters tuned on a narrower proxy.

    proxy_hidden_size is the proxy's width (at most the model's); init_std_multipliers are the proxy's tuned
    per-group init-std multipliers (default 1; not `norm`: the norms' weights are 1, not drawn), composed with
    the rule's like train.lr_multipliers (moeport.model.transfer has the rule and its source).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    proxy_hidden_size: int = Field(gt=0)
    init_std_multipliers: dict[str, float] = {}

    @field_validator("init_std_multipliers")
    @classmethod
    def _groups(cls, value: dict[str, float]) -> dict[str, float]:
        """Only known parameter groups that are drawn at random (not norm), each with a multiplier of 0 or more."""
        if "norm" in value:
            raise ValueError("norm: the norms' weights start at 1, not drawn: there is no init std to scale")
        return _check_groups(value)


class TrainSection(BaseModel):
    """Training settings (`train:` in a profile); the seed is the profile's `seed`.

    tokens_per_step is the global batch (every rank's rows together), in sequences of seq_len;
    ffn_experts_per_token is the compute-budget controller's target K_e (default 2/3 of the top-k);
    balance_groups is the balance loss's D (default: one group per expert-parallel rank);
    lr_multipliers scale the learning rate per parameter group (moeport.model.training.PARAMETER_GROUPS);
    width_transfer (optional) maps lr, lr_multipliers and the init, all as tuned on a narrower proxy, to this
    model's width (see `train_settings` and `init_std_multipliers`).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    lr: float = Field(default=1e-3, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_decay: Literal["constant", "cosine"] = "constant"
    seq_len: int = Field(default=128, ge=1)
    tokens_per_step: int = Field(default=2048, ge=1)
    ffn_experts_per_token: float | None = Field(default=None, gt=0)
    bias_update_rate: float = Field(default=0.5, ge=0)
    bias_update_decay: float = Field(default=1.0, gt=0, le=1)
    balance_coef: float = Field(default=3e-4, ge=0)  # the router-gradient ratio near 0.1 on the tiny preset
    balance_groups: int | None = Field(default=None, ge=1)
    z_loss_coef: float = Field(default=1e-6, ge=0)
    adam_eps: float = Field(default=1e-16, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)
    lr_multipliers: dict[str, float] = {}
    width_transfer: WidthTransferSection | None = None

    @field_validator("adam_betas", mode="before")
    @classmethod
    def _betas(cls, value: Any) -> Any:
        """YAML gives a list: two numbers in [0, 1)."""
        if isinstance(value, list):
            value = tuple(value)
        if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(b, (int, float)) for b in value)
                and all(0 <= b < 1 for b in value)):
            raise ValueError("expected two numbers in [0, 1), such as [0.9, 0.95]")
        return tuple(float(b) for b in value)

    @field_validator("lr_multipliers")
    @classmethod
    def _groups(cls, value: dict[str, float]) -> dict[str, float]:
        """Only known parameter groups, each with a multiplier of 0 or more."""
        return _check_groups(value)


def rows_per_step(profile: Any) -> int:
    """Sequences in the global batch: tokens_per_step / seq_len (a UserError where that is not whole)."""
    train = profile.train
    rows, rest = divmod(train.tokens_per_step, train.seq_len)
    if rest or rows < 1:
        raise UserError(f"{profile.source}: train.tokens_per_step {train.tokens_per_step} must be a positive "
                        f"multiple of train.seq_len {train.seq_len}")
    return rows


def _width_transfer(profile: Any, config: Any) -> WidthTransfer | None:
    """The profile's width transfer to the model `config`'s width (None without train.width_transfer); a proxy
    wider than the model is a UserError."""
    train = profile.train
    option = train.width_transfer
    if option is None:
        return None
    if option.proxy_hidden_size > config.hidden_size:
        raise UserError(f"{profile.source}: train.width_transfer.proxy_hidden_size {option.proxy_hidden_size} exceeds "
                        f"the model's hidden_size {config.hidden_size}; expected the narrower proxy's width")
    return width_transfer(option.proxy_hidden_size, config.hidden_size, train.lr_multipliers,
                          option.init_std_multipliers)


def init_std_multipliers(profile: Any, config: Any) -> dict[str, float]:
    """Per-group init-std multipliers (PARAMETER_GROUPS names) for `init_weights` when training the model `config`
    from scratch: the width transfer's (the proxy's init_std_multipliers times 1/sqrt(s) for the width-scaled
    groups), or none without train.width_transfer."""
    transfer = _width_transfer(profile, config)
    return {} if transfer is None else dict(transfer.init_std_multipliers)


def train_settings(profile: Any, config: Any) -> TrainSettings:
    """The model package's TrainSettings from a profile's `train:` section, checked against the model `config`.

    lr_multipliers: train.lr_multipliers as given; with train.width_transfer, those are read as the proxy's tuned
    multipliers and each is multiplied by the rule's factor for its group (1/s for unembedding, router,
    experts and hidden; 1 for embedding and norm), every group then present.
    """
    train = profile.train
    k_e = train.ffn_experts_per_token or DEFAULT_FFN_SHARE * config.moe_topk
    if k_e > config.moe_topk or (k_e == config.moe_topk and config.zero_expert_num):
        raise UserError(f"{profile.source}: train.ffn_experts_per_token {k_e:g} must be below the top-k "
                        f"{config.moe_topk}")
    groups = train.balance_groups or profile.ep
    if groups > config.n_routed_experts:
        raise UserError(f"{profile.source}: train.balance_groups {groups} exceeds the {config.n_routed_experts} FFN "
                        "experts")
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    values = {name: getattr(train, name) for name in fields if hasattr(train, name)}
    transfer = _width_transfer(profile, config)
    multipliers = dict(train.lr_multipliers) if transfer is None else dict(transfer.lr_multipliers)
    values.update(ffn_experts_per_token=k_e, balance_groups=groups, lr_multipliers=multipliers)
    return TrainSettings(**values)
