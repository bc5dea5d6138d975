"""The modeling file that makes a compressed checkpoint load with plain transformers:

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

transformers copies `modeling_ressvd.py` into its modules cache and imports it there, so the file
must stand alone: it imports only torch, transformers and the architecture's own *ForCausalLM.
ressvd writes it per checkpoint, with that class as base, from the source of the very classes
ressvd.load uses (LowRankLinear, the fused layout, the record check), so both loaders build the
same modules and give the same logits. `auto_map` in config.json points AutoModelForCausalLM at it.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from ..modules import fused, lowrank
from . import runtime
from .format import FORMAT_VERSION, CorruptCheckpointError

MODELING_FILE = "modeling_ressvd.py"
AUTO_CLASS = "AutoModelForCausalLM"

# What the modeling file holds, in order; each is copied from its ressvd source.
_EMBEDDED = (lowrank.LowRankLinear, fused.FusedLowRankGroup, fused.FusedLowRankMember, fused.group_module_name,
             fused.validate_layout, fused.fuse_group, runtime.swap_in_lowrank, runtime.check_record, runtime.apply_record,
             runtime.check_loaded_weights, runtime.CompressedModelMixin)

_HEADER = '''\
"""Modeling code of a ressvd compressed checkpoint (written by ressvd {version}).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("<this directory>", trust_remote_code=True)

builds {base} with the low-rank modules named in config.json's "ressvd" block (y = A(Bx); in the
fused layout, linears that read one input share one stacked B) and loads the factors into them.
A config or weights that do not match raise CorruptCheckpointError: the checkpoint never loads as a
dense model with random weights. Factors quantised to int8 (a "quantization" entry in the record)
load through transformers' torchao integration ("quantization_config"; needs torchao installed).
Self-contained: imports only torch and transformers.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from {module} import {base}

FORMAT_VERSION = {format_version}
LAYOUTS = {layouts!r}


class CorruptCheckpointError(ValueError):
    """The checkpoint does not match its ressvd record."""
'''

_CLASS = '''

class {name}(CompressedModelMixin, {base}):
    ressvd_error = CorruptCheckpointError
    ressvd_format_version = FORMAT_VERSION
'''


def base_class_for(config) -> type:
    """The architecture's own *ForCausalLM for this config (as ressvd.load builds it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def remote_class_name(base: type) -> str:
    return f"Ressvd{base.__name__}"


def modeling_source(base: type) -> str:
    from .. import __version__
    parts = [_HEADER.format(version=__version__, module=base.__module__, base=base.__name__,
                            format_version=FORMAT_VERSION, layouts=fused.LAYOUTS)]
    parts += ["\n\n" + inspect.getsource(obj) for obj in _EMBEDDED]
    parts.append(_CLASS.format(name=remote_class_name(base), base=base.__name__))
    source = "".join(parts)
    compile(source, MODELING_FILE, "exec")  # a broken template fails here, not in a user's load
    return source


def write_remote_code(directory: str | Path, model) -> str:
    """Write the modeling file into a saved checkpoint and point config.json's auto_map at it;
    return the auto_map entry."""
    directory = Path(directory)
    base = base_class_for(model.config)
    (directory / MODELING_FILE).write_text(modeling_source(base))
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    entry = f"{MODELING_FILE[:-3]}.{remote_class_name(base)}"
    config["auto_map"] = {**config.get("auto_map", {}), AUTO_CLASS: entry}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return entry


_CLASS_CACHE: dict[type, type] = {}


def compressed_model_class(base: type) -> type:
    """ressvd.load's class: `base` with the same mixin as the modeling file, raising ressvd's
    CorruptCheckpointError. Named like `base` so that a re-saved config names the architecture."""
    if base not in _CLASS_CACHE:
        _CLASS_CACHE[base] = type(base.__name__, (runtime.CompressedModelMixin, base), {
            "ressvd_error": CorruptCheckpointError, "ressvd_format_version": FORMAT_VERSION,
            "__module__": base.__module__})
    return _CLASS_CACHE[base]
