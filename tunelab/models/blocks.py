"""Where a transformer's blocks are: by the names transformers gives them (`model.layers.12`, `h.3`, `block.0`).

Torch-free at import: the method modules' configs read `block_index` without it.
"""

from __future__ import annotations

import re

BLOCK_LISTS = ("layers", "layer", "h", "blocks", "block")  # the attribute names of the ModuleLists holding blocks


def block_index(name: str) -> int | None:
    """The transformer-block index in a parameter name (`...layers.12.mlp...` -> 12)."""
    m = re.search(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.", "." + name + ".")
    return int(m.group(1)) if m else None


def block_lists(model) -> list:
    """(name, ModuleList) of the lists holding the transformer blocks: one, two for encoder-decoders, none for a
    model not named this way."""
    import torch

    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList)
        and name.rsplit(".", 1)[-1] in BLOCK_LISTS
        and block_index(name + ".x") is None  # not a list inside a block (T5's block.N.layer)
        and len(module) > 0
    ]
