"""The optimizer: AdamW with global-norm clipping, a learning-rate schedule, a decay mask."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant", "wsd")


def make_schedule(
    name: str,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> optax.Schedule:
    """Learning rate per step.

    cosine:   linear warmup, then cosine decay to min_lr_ratio * lr at total_steps.
    constant: linear warmup, then flat.
    wsd:      warmup-stable-decay: linear warmup, flat, then a linear decay to
              min_lr_ratio * lr over the last `decay_fraction` of the steps.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r}; valid: {SCHEDULES}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    end = learning_rate * min_lr_ratio
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    if name == "cosine":
        body = optax.cosine_decay_schedule(
            learning_rate, max(total_steps - warmup_steps, 1), alpha=min_lr_ratio
        )
    elif name == "constant":
        body = optax.constant_schedule(learning_rate)
    else:
        decay_steps = max(int(total_steps * decay_fraction), 1)
        stable = max(total_steps - warmup_steps - decay_steps, 0)
        body = optax.join_schedules(
            [
                optax.constant_schedule(learning_rate),
                optax.linear_schedule(learning_rate, end, decay_steps),
            ],
            [stable],
        )
    if warmup_steps == 0:
        return body
    return optax.join_schedules([warmup, body], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: every matrix, never a norm scale."""

    def keep(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        return not any("norm" in str(n) for n in names) and jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    schedule: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, masked off norms) after global-norm clipping."""
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts)
