"""Shared by the tests: a random tiny LLaMA written by transformers, the reference minee must match."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


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
