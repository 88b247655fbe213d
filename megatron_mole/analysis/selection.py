"""Router Lens's selection file (``analyze --select N`` writes it) and the CEFT targets it gives.

``selection.json``: ``{"select": N, "routers": {name: {"kind": "moe" | "mole", "layer": L,
"experts": [ids, most used first], "uses": [count per expert]}}, ...}``. CEFT
(``train`` with ``trainable_experts: selection.json``) puts a LoRA on fc1 and fc2 of the
selected experts of every base MoE router (kind "moe"): the target patterns
``decoder.layers.L.mlp.experts.local_experts.{e1,e2}.linear_fc1`` (global expert ids).
"""
import json

from megatron_mole.errors import ConfigError


def read_selection(path) -> dict:
    """The selection file at ``path``, checked; errors name the file and the entry."""
    try:
        with open(path, encoding="utf-8") as handle:
            selection = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"trainable_experts: cannot read the selection file {path}: {error}") from None
    routers = selection.get("routers") if isinstance(selection, dict) else None
    if not isinstance(routers, dict) or not routers:
        raise ConfigError(f"trainable_experts: {path} has no 'routers' mapping (write it with "
                          f"megatron-mole analyze --select N)")
    for name, entry in routers.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("layer"), int) and isinstance(entry.get("experts"), list)
              and entry["experts"] and all(isinstance(e, int) and e >= 0 for e in entry["experts"]))
        if not ok:
            raise ConfigError(f"trainable_experts: {path}: routers.{name} needs 'layer' (int) and 'experts' "
                              f"(a non-empty list of expert ids), got {entry!r:.120}")
    return selection


def ceft_targets(selection: dict, path="selection") -> list:
    """MoLEConfig target patterns of the selected experts' fc1 and fc2 (base MoE routers only)."""
    targets = []
    for name, entry in sorted(selection["routers"].items(), key=lambda item: item[1]["layer"]):
        if entry.get("kind", "moe") != "moe":
            continue
        ids = ",".join(str(e) for e in sorted(set(entry["experts"])))
        for linear in ("linear_fc1", "linear_fc2"):
            targets.append(f"decoder.layers.{entry['layer']}.mlp.experts.local_experts.{{{ids}}}.{linear}")
    if not targets:
        raise ConfigError(f"trainable_experts: {path} selects no expert of a base MoE router (kind 'moe'); "
                          f"it was written for MoLE routers")
    return targets
