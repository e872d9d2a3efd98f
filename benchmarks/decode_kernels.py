"""Kernels per decode step, counted in the compiled decode program: a CPU-visible proxy for kernel launches
and the per-step fixed cost (bench_generate.py's "kernels per decode step" line, tests/test_decode_cost.py's
bounds)."""

from __future__ import annotations


def decode_step_ops(engine, batch: int, span: int, split: bool = True) -> dict:
    """The per-step fixed cost of the (batch, span) decode program, from its optimized HLO
    (``hlo_stats.decode_step_profile``): kernels per decode-loop iteration (greedy, and with sampling and
    log-probabilities), bytes moved by copy-like kernels, and (``split``: two more compiles) the split per
    layer / outside the layers."""
    from maxjax.runtime.hlo_stats import decode_step_profile

    text = engine.compiled_text("decode", (batch, span))
    greedy, sampled = decode_step_profile(text, "smallest"), decode_step_profile(text, "largest")
    out = {"batch": batch, "greedy": greedy["kernels"], "by_opcode": greedy["by_opcode"],
           "per_layer": greedy["kernels"] / engine.model_config.num_layers,
           "sampling_and_logprobs": sampled["kernels"], "sampling_inner_loop_iterations":
           sampled["inner_loop_iterations"], "moved_MB": greedy["moved_bytes"] / 1e6,
           "weight_copy_MB": greedy["weight_copy_bytes"] / 1e6, "state_copy_MB": greedy["state_copy_bytes"] / 1e6}
    split = layer_split(engine, batch, span) if split else None
    if split:
        out.update(per_layer=split["per_layer"], outside_layers=split["outside_layers"])
    return out


def layer_split(engine, batch: int, span: int) -> dict | None:
    """Kernels per layer and outside the layers of a greedy decode step, from the same program built for 2 and 3
    layers of the model's config (random float weights, one device; with 1 layer XLA shares more), with those
    two programs' profiles; None where that cannot be built. The full program can launch a few more per layer."""
    import dataclasses

    import jax

    from maxjax.runtime.engine import Engine
    from maxjax.runtime.hlo_stats import decode_step_profile

    arch, cfg = engine.arch, engine.model_config
    if engine.mesh is not None or not hasattr(arch, "init_params") or not dataclasses.is_dataclass(cfg):
        return None
    profiles = []
    for layers in (2, 3):
        types = getattr(cfg, "layer_types", None)
        small = dataclasses.replace(cfg, num_layers=layers, **({"layer_types": types[:layers]} if types else {}))
        config = dataclasses.replace(engine.config, quantize=None, max_loras=0, length_buckets=(span,),
                                     max_prefill_len=span, prefill_length_buckets=(span,), prefill_batch_buckets=(1,),
                                     batch_buckets=(batch,), max_seq_len=span, max_batch_size=batch)
        probe = Engine(arch, small, arch.init_params(small, jax.random.key(0)), config)
        profiles.append(decode_step_profile(probe.compiled_text("decode", (batch, span))))
    per_layer = profiles[1]["kernels"] - profiles[0]["kernels"]
    return {"per_layer": per_layer, "outside_layers": profiles[0]["kernels"] - 2 * per_layer, "profiles": profiles}
