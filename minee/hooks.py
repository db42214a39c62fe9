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
