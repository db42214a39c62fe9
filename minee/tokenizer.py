"""A thin wrapper over a Hugging Face `tokenizers.Tokenizer` read from tokenizer.json.

Special tokens such as BOS are added exactly as the tokenizer.json's post-processor says,
which is how the model was trained to see its input.
"""
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, path, chat_template=None):
        self.hf = _HFTokenizer.from_file(str(path))
        self.chat_template = chat_template
        self.vocab_size = self.hf.get_vocab_size()

    def encode(self, text: str, add_special_tokens=True) -> list:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids) -> list:
        """Each id's text on its own (what a lens plot labels a cell with)."""
        return [self.hf.decode([int(i)]) for i in ids]

    def apply_chat_template(self, messages) -> str:
        """The prompt text for [{"role": ..., "content": ...}], from the model's Jinja chat template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (chat_template in tokenizer_config.json); "
                             "pass a plain prompt without --chat")
        import jinja2
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(model_dir):
    """The directory's tokenizer, or None if it has no tokenizer.json."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    template = cfg.get("chat_template")
    jinja = model_dir / "chat_template.jinja"            # newer HF checkpoints keep it here
    if template is None and jinja.is_file():
        template = jinja.read_text()
    return Tokenizer(path, template)
