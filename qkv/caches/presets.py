"""Named presets and ``build_policy``: a preset name (with overrides) or a spec string."""

from __future__ import annotations

import dataclasses
import difflib
import re

from qkv.caches.policy import Policy, TensorPolicy
from qkv.component import check_int
from qkv.errors import ConfigError, UnknownComponentError, shown
from qkv.quantizers import ProgressiveResidual, SingleStage
from qkv.spec import KINDS, parse_policy_spec

# name -> (spec, one-line description)
PRESETS: dict[str, tuple[str, str]] = {
    "qvg": (
        "kmeans(clusters=256,iters=5,init=random),centroid,int2(block=64)",
        "QVG: k-means smoothing (C=256), one stage, INT2 mid-rise, blocks of 64, E4M3 scales",
    ),
    "qvg-pro": (
        "kmeans(clusters=256,iters=5,init=random),centroid,progressive(stages=4),int2(block=16)",
        "QVG-Pro: four progressive residual stages, INT2 blocks of 16",
    ),
    "qvg-int4": (
        "kmeans(clusters=256,iters=5,init=random),centroid,int4(block=64)",
        "QVG with INT4 codes",
    ),
    "qvg-ref": (
        "kmeans(clusters=256,iters=2,init=random),centroid,int2(block=64,mode=sym)",
        "the reference implementation's choices: 3-level symmetric INT2, E4M3 scales, "
        "2 k-means iterations from random init",
    ),
    "rtn": (
        "int2(block=16)",
        "round-to-nearest per token, INT2 mid-rise, blocks of 16 along D",
    ),
    "kivi": (
        "k:int2(block=32,mode=asym,axis=channel,scale=fp16),i32lsb,window(tokens=128);"
        "v:int2(block=32,mode=asym,scale=fp16),i32lsb,window(tokens=128)",
        "KIVI: keys per channel, values per token, asymmetric INT2, group 32, fp16 scale and "
        "zero, 128 newest tokens in full precision, int32 LSB-first packing",
    ),
    "quarot": (
        "hadamard,int2(block=16)",
        "QuaRot (KV part): Hadamard rotation along D, then INT2 per token, blocks of 16",
    ),
    "bf16": ("bf16", "no compression: K and V stored as bfloat16"),
}

# override -> what it changes
OVERRIDES = {
    "bits": "quantizer code width (1-8)",
    "block": "quantizer block size",
    "mode": "quantizer mode: sym, midrise or asym",
    "scale": "scale format: fp32, fp16, bf16, fp8",
    "clusters": "clusters per stage (kmeans, faiss)",
    "iters": "k-means iterations (kmeans, faiss)",
    "warm_iters": "k-means iterations of a span warm-started from the previous one's centroids (kmeans)",
    "seed": "clustering seed (kmeans, faiss)",
    "finish": "how k-means ends: assign (one more assignment pass) or update (the last means, as the reference) (kmeans)",
    "stages": "number of grouping + smoothing stages (1 = single)",
    "window": "newest tokens kept in full precision",
}


def list_policies() -> list[str]:
    """Names of the preset policies."""
    return list(PRESETS)


def _override_tensor(policy: TensorPolicy, key: str, value: object) -> TensorPolicy | None:
    """``policy`` with one override applied, or None if it does not apply to this policy."""
    if key in ("bits", "block", "mode", "scale"):
        if not policy.quantizer.has_param(key):
            return None
        return dataclasses.replace(policy, quantizer=policy.quantizer.replace(**{key: value}))
    if key in ("clusters", "iters", "warm_iters", "seed", "finish"):
        if not policy.grouping.has_param(key):
            return None
        return dataclasses.replace(policy, grouping=policy.grouping.replace(**{key: value}))
    if key == "stages":
        check_int("override", "stages", value, 1)
        if not policy.smoothing.needs_groups:
            return None
        staging = SingleStage() if value == 1 else ProgressiveResidual(stages=value)
        return dataclasses.replace(policy, staging=staging)
    if key == "window":
        return dataclasses.replace(policy, window=value)
    raise ConfigError(f"unknown override {shown(key)}; valid overrides: {', '.join(OVERRIDES)}")


# What a preset name looks like (no arguments, commas or k:/v: parts, unlike a spec)
_WORD = re.compile(r"\s*[A-Za-z0-9_.\-]+\s*")


def _check_bare_name(name: str) -> None:
    """A bare word that is neither a preset nor a component: name the preset it was probably
    meant to be (a blank around it, ``_`` for ``-``, another case) and list the presets."""
    word = name.strip()
    if not _WORD.fullmatch(name) or any(word in registry for registry in KINDS.values()):
        return
    if word in PRESETS:
        raise UnknownComponentError(f"unknown policy {shown(name)}: remove the blanks around the preset {word!r}")
    close = difflib.get_close_matches(word.lower().replace("_", "-"), PRESETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownComponentError(
        f"unknown policy {shown(name)}{hint} presets: {', '.join(PRESETS)} (or pass a spec string)"
    )


def build_policy(name_or_spec: str, **overrides: object) -> Policy:
    """A policy from a preset name (see :func:`list_policies`) or a spec string.

    Keyword overrides (see ``OVERRIDES``) change the documented parameters of both the K and the
    V policy, e.g. ``build_policy("qvg", clusters=64, bits=4)``. An override that applies to
    neither raises :class:`ConfigError`.
    """
    if not isinstance(name_or_spec, str):
        raise ConfigError(f"build_policy takes a preset name or spec string, got {type(name_or_spec).__name__}")
    preset = PRESETS.get(name_or_spec)
    if preset is None:
        _check_bare_name(name_or_spec)
    k_fields, v_fields = parse_policy_spec(preset[0] if preset else name_or_spec)
    policy = Policy(TensorPolicy(**k_fields), TensorPolicy(**v_fields))
    k, v = policy.k, policy.v
    for key, value in overrides.items():
        new_k, new_v = _override_tensor(k, key, value), _override_tensor(v, key, value)
        if new_k is None and new_v is None:
            raise ConfigError(f"override {key}={shown(value)} does not apply to {shown(name_or_spec)} ({policy.spec})")
        k, v = new_k or k, new_v or v
    name = name_or_spec if preset else None
    if overrides and name:
        name += "(" + ",".join(f"{key}={value}" for key, value in overrides.items()) + ")"
    return Policy(k, v, name=name)
