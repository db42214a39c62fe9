"""Shared by the tests: a random tiny LLaMA written by transformers, the reference minee must match,
and a tiny random minee model whose word-level tokenizer lets CLI tests choose the prompt's ids."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import weights_tool


def random_llama(path, seed=0, std=0.1, head_std=None, bias_std=0.05, dtype=torch.float32,
                 max_shard_size=None, **config):
    """Build a random LlamaForCausalLM from LlamaConfig(**config), save it to `path` in `dtype`
    and return the float32 model reloaded from that checkpoint, so the reference sees exactly the
    (rounded) weights minee loads. Norm weights are 1 + 0.1 noise, biases N(0, bias_std), the LM
    head N(0, head_std or std), everything else N(0, std): large enough that outputs vary."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                torch.nn.init.normal_(p, std=bias_std)
            else:
                torch.nn.init.normal_(p, std=head_std if head_std and "lm_head" in name else std)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(path, **kwargs)
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def word_level_model(path):
    """A tiny random model (4 blocks, vocab 120) written to `path` with a word-level tokenizer
    ('w0' .. 'w119'), so a text prompt encodes to the ids chosen with words(); returns path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    weights_tool.make_random_model(path, layers=4, d_model=48, heads=4, kv_heads=2, ffn=96, vocab=120,
                                   untied=True, std=0.15, seed=3)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(120)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path


def random_shortcuts(model, seed=1, scale=0.3):
    """Shortcuts for `model` far from the identity, so that decoding through them changes the lens
    visibly (the last point's map is the identity, as a fitted one is)."""
    import numpy as np

    from minee import shortcuts
    D, P = model.config.d_model, 2 * model.config.n_layers
    rng = np.random.default_rng(seed)
    w = (np.eye(D) + scale * rng.standard_normal((P, D, D))).astype(np.float32)
    b = rng.standard_normal((P, D)).astype(np.float32)
    w[-1], b[-1] = np.eye(D), 0
    meta = {"fingerprint": shortcuts.fingerprint(model), "model": "tiny", "tokens": 0, "ridge": 0.0,
            "method": "lstsq", "points": list(range(P - 1))}
    return shortcuts.Shortcuts(w, b, meta)


def words(ids):
    """The text word_level_model's tokenizer encodes to `ids`."""
    return " ".join(f"w{i}" for i in ids)


def hf_greedy(hf, ids, n):
    """n greedy tokens from a transformers model after ids, by a plain argmax loop over full passes
    (the reference for minee.generate; transformers' generate would stop at or suppress EOS)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(hf(torch.tensor([out]), logits_to_keep=1).logits[0, -1].argmax()))
    return out[len(ids):]
