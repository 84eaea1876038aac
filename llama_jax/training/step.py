"""The training and evaluation steps: pure functions of (state, batch), jitted once with
explicit shardings and a donated state (`jit_steps`), shared by the trainer and `llama3 plan`.

`make_train_step` builds `train_step(state, batch, base=None) -> (state, metrics)`: the loss in
chunks of tokens (loss.py), gradient accumulation over strided microbatches normalised by the
whole batch's token count, the optimizer, and the finiteness guard (a non-finite step changes
nothing but the step counter). Under LoRA the state's params are the adapters and `base` the
frozen weights.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from llama_jax.model import lora, sharding
from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import Transformer, init_params
from llama_jax.training import loss as loss_lib
from llama_jax.training import optim


def make_tx(
    c: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The experiment's optimizer (optim.make_optimizer) and its learning-rate schedule."""
    # warmup_steps = -1: 5% of the steps (the default experiment's, whose length is in epochs)
    warmup = c.warmup_steps if c.warmup_steps >= 0 else max(1, round(0.05 * num_steps))
    schedule = optim.make_schedule(
        c.schedule,
        c.learning_rate,
        num_steps,
        warmup,
        c.min_lr_ratio,
        c.wsd_decay_fraction,
    )
    tx = optim.make_optimizer(
        schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, grad_clip=c.grad_clip
    )
    return tx, schedule


def init_state(model_cfg: ModelConfig, tx, seed: int, lora_cfg=None) -> dict:
    """Boxed train state: params and optimizer state keep their logical axes.

    Under LoRA the trained params are the adapters alone (the base is an argument of the step).
    """
    rng = jax.random.key(seed)
    params = init_params(model_cfg, rng)
    if lora_cfg is not None:
        params = lora.init_adapters(params, lora_cfg, jax.random.fold_in(rng, 2))
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        # Threaded through every step and checkpointed, for stochastic training features
        # (dropout, sampled objectives); the Llama objective itself draws nothing.
        "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
    }


def base_shardings(model_cfg: ModelConfig, mesh, dtype: str):
    """Shardings and abstract shapes of a frozen base in `dtype` (LoRA)."""
    abstract = jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))
    shard = sharding.logical_to_sharding(abstract, mesh, sharding.LOGICAL_RULES)
    return shard, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), nn.unbox(abstract))


def loss_terms(params, batch, model: Transformer, z_loss: float, chunk_tokens: int = 0):
    """Summed masked next-token NLL, summed z-loss and the mask count of one (micro)batch.

    chunk_tokens > 0 computes the cross-entropy in chunks of that many tokens from the hidden
    states (loss.py: no [B*T, V] float32 logits, same values and gradients); 0 from full logits.
    """
    if chunk_tokens < 0:
        raise ValueError(
            f"loss_chunk_tokens={chunk_tokens}; valid: 0 (full logits) or a positive int"
        )
    mask = batch["loss_mask"]
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    if chunk_tokens > 0:
        hidden, _ = model.apply({"params": params}, *args, return_hidden=True)
        w, layout = loss_lib.output_head(params, model.config)
        nll, zl = loss_lib.chunked_cross_entropy(
            hidden, w, layout, batch["targets"], mask, z_loss, chunk_tokens
        )
    else:
        logits, _ = model.apply({"params": params}, *args)
        nll, zl = loss_lib.plain_cross_entropy(logits, batch["targets"], mask, z_loss)
    return nll, zl, jnp.sum(mask)


def make_train_step(
    model_cfg: ModelConfig, tx, schedule, c: ml_collections.ConfigDict, lora_cfg=None
):
    """train_step(state, batch, base=None) -> (state, metrics); `base` is the frozen base under
    LoRA (the state's params are then the adapters) and unused (may be omitted) otherwise."""
    model = Transformer(model_cfg, dense=lora.lora_dense) if lora_cfg else Transformer(model_cfg)
    accum = c.grad_accum_steps

    def micro_grads(params, mb, base, rng):
        def f(p):
            full = p if lora_cfg is None else lora.combine(base, p, lora_cfg, rng)
            nll, zl, n = loss_terms(full, mb, model, c.z_loss, c.get("loss_chunk_tokens", 0))
            return nll + zl, (nll, n)

        (_, (nll, n)), g = jax.value_and_grad(f, has_aux=True)(params)
        return g, nll, n

    def train_step(state, batch, base=None):
        params = state["params"]
        rng = jax.random.wrap_key_data(state["rng"])
        if accum == 1:
            grads, nll, ntok = micro_grads(params, batch, base, rng)
        else:
            # Strided microbatches: rows i*A + a form microbatch a, so each device keeps
            # contributing its own rows to every microbatch (no resharding).
            mbs = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
                batch,
            )

            def body(carry, xs):
                mb, i = xs
                g, nll, n = micro_grads(params, mb, base, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, nll, n)), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
            (grads, nll, ntok), _ = jax.lax.scan(body, zeros, (mbs, jnp.arange(accum)))
        denom = jnp.maximum(ntok, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll / denom
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # The updated state is checked too (a finite gradient can still overflow a moment or a
        # weight). A non-finite step changes nothing but the step counter (skip), or is
        # reported and the run stops (abort); either way no non-finite value reaches the state.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((new_params, new_opt))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": jax.random.key_data(
                jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 0)
            ),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "tokens": ntok,
            "finite": finite,
        }
        return new_state, metrics

    return train_step


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_eval_step(model_cfg: ModelConfig, lora_cfg=None, chunk_tokens: int = 0):
    """eval_step(params, batch, base=None) -> (summed NLL, token count) of one batch.

    `chunk_tokens` is the training step's `loss_chunk_tokens`: validation computes the loss in
    the same chunks, so it never builds the [B, T, V] float32 logits training avoids (at a 128k
    vocabulary, the largest buffer of the run).
    """
    model = Transformer(model_cfg, dense=lora.lora_dense) if lora_cfg else Transformer(model_cfg)

    def eval_step(params, batch, base=None):
        full = params if lora_cfg is None else lora.combine(base, params, lora_cfg)
        nll, _, n = loss_terms(full, batch, model, 0.0, chunk_tokens)
        return nll, n

    return eval_step


def jit_steps(
    model_cfg: ModelConfig, tx, schedule, c, lora_cfg, mesh, state_shardings, base_sharding
):
    """(train_step, eval_step) jitted with their shardings; the train state is donated.

    train_step(state, batch, base) -> (state, metrics); eval_step(params, batch, base) ->
    (summed nll, tokens). `base_sharding` is {} without LoRA. plan.py compiles these same two.
    """
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(model_cfg, tx, schedule, c, lora_cfg),
        in_shardings=(state_shardings, batch_sharding, base_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(model_cfg, lora_cfg, c.get("loss_chunk_tokens", 0)),
        in_shardings=(state_shardings["params"], batch_sharding, base_sharding),
        out_shardings=sharding.replicated(mesh),
    )
    return train_step, eval_step
