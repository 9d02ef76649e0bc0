"""`tyr export`: write a pruned model as a Hugging Face folder, and `load_pruned` to read it back.

Two formats:

* ``hf`` (default): the compact model. Tensor names are the family's own (``model.layers.N.self_attn.q_proj.weight``
  ...), only their shapes shrink. When every layer keeps the same numbers of heads, KV heads and channels, each
  kept KV head serves the same number of query heads and no layer is fully pruned, the config is the family's
  stock config with smaller ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` (no remote
  code). Otherwise it is a ``tyr_<family>`` config with per-layer lists, and ``modeling_tyr.py`` (imports only torch
  and transformers) is written next to it with an ``auto_map``, so that
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works without tyr installed.
* ``dense-masked``: the original architecture and config; pruned heads and channels are zeroed (their q/k/v and
  gate/up rows, and their o_proj/down_proj columns) and the kept o_proj/down_proj columns hold the re-fitted
  weights. Loads with stock transformers anywhere; computes the same function as ``hf`` (up to rounding).

Both also hold the tokenizer, ``generation_config.json``, ``architecture.json`` and a model card ``README.md``.
The folder is written next to ``--out`` under a temporary name and renamed at the end, so an interrupted export
leaves nothing half-written behind.

One job per module: ``architecture`` (kept units per layer, ``architecture.json``), ``config`` (``config.json``),
``weights`` (the realised state dict, safetensors shards), ``card`` (``README.md``), ``folder`` (output-folder
checks, temp folder + rename), ``writer`` (``export_model``, the orchestrator), ``run`` (a finished run's final
model), ``load`` (``load_pruned``) and ``cli`` (``tyr export``). torch loads on first use: ``tyr --help`` stays
fast.
"""

from tyr.export.architecture import (
    ARCHITECTURE_FILE,
    LayerShape,
    check_architecture,
    compute_architecture,
    genome_shapes,
    is_uniform,
    layer_shapes,
)
from tyr.export.card import markdown_escape, model_card
from tyr.export.cli import add_export_parser, cmd_export
from tyr.export.config import MODELING_FILE, pruned_config
from tyr.export.folder import check_output_folder
from tyr.export.load import load_pruned, register_auto_classes
from tyr.export.run import RunFinal, export_run, load_run_model, read_run
from tyr.export.weights import DEFAULT_SHARD_BYTES, write_weights
from tyr.export.writer import FORMATS, export_model

__all__ = [
    "ARCHITECTURE_FILE",
    "DEFAULT_SHARD_BYTES",
    "FORMATS",
    "MODELING_FILE",
    "LayerShape",
    "RunFinal",
    "add_export_parser",
    "check_architecture",
    "check_output_folder",
    "cmd_export",
    "compute_architecture",
    "export_model",
    "export_run",
    "genome_shapes",
    "is_uniform",
    "layer_shapes",
    "load_pruned",
    "load_run_model",
    "markdown_escape",
    "model_card",
    "pruned_config",
    "read_run",
    "register_auto_classes",
    "write_weights",
]
