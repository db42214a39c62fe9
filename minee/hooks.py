"""Choosing hook points by name, glob or predicate, and numbering the early-exit points."""
import fnmatch


def select_hooks(all_names, names=None):
    """The hook names picked by `names`: None (all), a glob string, a list of names/globs, or a predicate."""
    if names is None:
        return list(all_names)
    if callable(names):
        return [n for n in all_names if names(n)]
    patterns = [names] if isinstance(names, str) else list(names)
    picked = [n for n in all_names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
    if unmatched:
        raise KeyError(f"no hook point matches {unmatched}; names look like 'hook_embed', "
                       "'blocks.3.hook_resid_mid', 'blocks.*.hook_resid_post', 'hook_final_norm'")
    return picked


# The early-exit points: the residual stream after each sub-layer, p = 0 .. 2L-1.
# p = 2l is blocks.{l}.hook_resid_mid (after attention), p = 2l+1 is blocks.{l}.hook_resid_post (after the FFN).

def exit_point_names(n_layers):
    """The 2L exit-point hook names in point order."""
    return [point_name(p) for p in range(2 * n_layers)]


def point_name(p):
    """Exit point index -> hook name."""
    if p < 0:
        raise ValueError(f"exit points count from 0, got {p}")
    return f"blocks.{p // 2}.hook_resid_{'mid' if p % 2 == 0 else 'post'}"


def point_index(name):
    """Hook name -> exit point index (only resid_mid / resid_post are exit points)."""
    parts = name.split(".")
    if (len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit()
            or parts[2] not in ("hook_resid_mid", "hook_resid_post")):
        raise KeyError(f"{name!r} is not an exit point; exit points are 'blocks.{{l}}.hook_resid_mid' "
                       "and 'blocks.{l}.hook_resid_post'")
    return 2 * int(parts[1]) + (parts[2] == "hook_resid_post")


def point_label(p):
    """Short human label: 'L3.attn' / 'L3.mlp' (block 3 after attention / after the FFN)."""
    return f"L{p // 2}.{'attn' if p % 2 == 0 else 'mlp'}"
