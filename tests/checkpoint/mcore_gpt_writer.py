"""Builds a tiny Nemotron-style megatron-core ``GPTModel`` on CPU and saves it the way NeMo 1 does.

Run as a script with megatron-core importable: ``python mcore_gpt_writer.py OUT_DIR TOKENIZER_MODEL [zarr]``.
Writes under OUT_DIR:

- ``logits.pt``: megatron-core's own fp32 forward on ``input_ids.pt`` (first 320 vocab columns);
- ``local/``: ``model_config.yaml`` + tokenizer artifact + ``model_weights/`` saved by
  ``dist_checkpointing.save(model.sharded_state_dict(prefix="model."))`` (torch_dist); megatron's
  local spec already saves its norms under the TE spec's fused names (``linear_qkv.layer_norm_weight``);
- ``unmapped/``: the same saved after emptying each layer's ``sharded_state_dict_keys_map`` (the local
  spec's map renames ``input_layernorm.``/``pre_mlp_layernorm.`` to the TE spec's fused names), so the
  stacked keys keep the local names (``model.decoder.layers.input_layernorm.weight``);
- ``legacy/``: the same tree with a NeMo 1 ``model_weights.ckpt`` (``torch.save`` of the prefixed state dict);
- ``state_dict.pt``: the plain state dict.

With ``zarr`` (an older megatron-core that still has the zarr strategy): rebuilds the model, loads
``state_dict.pt``, saves ``logits_zarr.pt`` from this version's forward and ``zarr/`` with
``sharded_strategy=("zarr", 1)``.

Transformer Engine and Apex are absent on CPU: the local spec's norm is replaced by megatron's own
``FusedLayerNorm`` (what NeMo uses without TE), whose apex kernel is stood in for by ``F.layer_norm``;
megatron's code still applies the zero-centred gamma (``weight + 1``). Exits 77 when megatron-core is missing.
"""

import contextlib
import os
import shutil
import sys
import uuid

import torch
import torch.distributed as dist
import torch.nn.functional as F

VOCAB, PADDED_VOCAB, SEQ = 320, 384, 256
TOKENIZER_NAME = f"{uuid.UUID(int=5).hex}_tokenizer.model"
MODEL_CONFIG = f"""\
precision: 32
micro_batch_size: 1
global_batch_size: 1
tensor_model_parallel_size: 1
pipeline_model_parallel_size: 1
encoder_seq_length: {SEQ}
max_position_embeddings: {SEQ}
num_layers: 2
hidden_size: 64
ffn_hidden_size: 128
num_attention_heads: 4
num_query_groups: 2
kv_channels: null
init_method_std: 0.02
use_scaled_init_method: true
hidden_dropout: 0.0
attention_dropout: 0.0
ffn_dropout: 0.0
apply_query_key_layer_scaling: false
normalization: layernorm1p
layernorm_epsilon: 1.0e-05
do_layer_norm_weight_decay: false
make_vocab_size_divisible_by: 128
pre_process: true
post_process: true
persist_layer_norm: true
bias: false
activation: squared-relu
headscale: false
transformer_block_type: pre_ln
openai_gelu: false
normalize_attention_scores: true
position_embedding_type: rope
rotary_percentage: 0.5
rotary_base: 10000
attention_type: multihead
share_embeddings_and_output_weights: false
mcore_gpt: true
dist_ckpt_format: torch_dist
tokenizer:
  library: sentencepiece
  type: null
  model: nemo:{TOKENIZER_NAME}
  vocab_file: null
  merge_file: null
  delimiter: null
  sentencepiece_legacy: false
seq_length: {SEQ}
"""


def _stand_in_for_apex() -> None:
    """Let megatron's FusedLayerNorm run without apex: its affine kernel becomes ``F.layer_norm``."""
    from megatron.core.fusions import fused_layer_norm

    class LayerNormAffine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, input, weight, bias, normalized_shape, eps, memory_efficient=False):
            return F.layer_norm(input, normalized_shape, weight, bias, eps)

    fused_layer_norm.HAVE_FUSED_LAYER_NORM = True
    fused_layer_norm.FusedLayerNormAffineFunction = LayerNormAffine


def build_model():
    try:
        from megatron.core.activations import squared_relu
    except ImportError:  # megatron-core < 0.11 has no activations module
        def squared_relu(x):
            return torch.pow(F.relu(x), 2)
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.transformer_config import TransformerConfig

    _stand_in_for_apex()
    transformer_block.LayerNormImpl = FusedLayerNorm  # the final layernorm
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        activation_func=squared_relu, normalization="LayerNorm", layernorm_zero_centered_gamma=True,
        layernorm_epsilon=1e-5, add_bias_linear=False, gated_linear_unit=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False)
    spec = get_gpt_layer_local_spec()
    spec.submodules.input_layernorm = FusedLayerNorm
    spec.submodules.pre_mlp_layernorm = FusedLayerNorm
    model = GPTModel(config, spec, vocab_size=PADDED_VOCAB, max_sequence_length=SEQ, pre_process=True,
                     post_process=True, share_embeddings_and_output_weights=False, position_embedding_type="rope",
                     rotary_percent=0.5, rotary_base=10000)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if "norm" in name else 0.08
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model.eval()


def save_dist(model, directory: str, **kwargs) -> None:
    from megatron.core import dist_checkpointing

    os.makedirs(directory)
    dist_checkpointing.save(model.sharded_state_dict(prefix="model."), directory, **kwargs)


def checkpoint_dir(out: str, name: str, tokenizer: str) -> str:
    directory = os.path.join(out, name)
    os.makedirs(directory)
    with open(os.path.join(directory, "model_config.yaml"), "w") as file:
        file.write(MODEL_CONFIG)
    shutil.copyfile(tokenizer, os.path.join(directory, TOKENIZER_NAME))
    return directory


def main(out: str, tokenizer: str, zarr: bool) -> None:
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        sys.exit(77)
    from mcore_cpu import megatron_on_cpu  # beside this script

    megatron_on_cpu()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core import tensor_parallel

    class NoRngTracker:  # the CUDA RNG tracker only seeds dropout (0 here, eval mode)
        fork = staticmethod(contextlib.nullcontext)

    tensor_parallel.get_cuda_rng_tracker = lambda *args, **kwargs: NoRngTracker()
    model = build_model()
    input_ids = torch.load(os.path.join(out, "input_ids.pt"))
    length = input_ids.shape[1]
    position_ids = torch.arange(length).unsqueeze(0).expand_as(input_ids)
    causal = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)  # True = masked out
    if zarr:
        model.load_state_dict(torch.load(os.path.join(out, "state_dict.pt")))
    with torch.no_grad():
        logits = model(input_ids, position_ids, causal)
    logits = logits[..., :VOCAB].float().contiguous()
    if zarr:
        torch.save(logits, os.path.join(out, "logits_zarr.pt"))
        save_dist(model, os.path.join(checkpoint_dir(out, "zarr", tokenizer), "model_weights"),
                  sharded_strategy=("zarr", 1))
        dist.destroy_process_group()
        return
    torch.save(logits, os.path.join(out, "logits.pt"))
    save_dist(model, os.path.join(checkpoint_dir(out, "local", tokenizer), "model_weights"))
    for layer in model.decoder.layers:
        layer.submodules_config.sharded_state_dict_keys_map = {}
    save_dist(model, os.path.join(checkpoint_dir(out, "unmapped", tokenizer), "model_weights"))
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save(state, os.path.join(checkpoint_dir(out, "legacy", tokenizer), "model_weights.ckpt"))
    torch.save(model.state_dict(), os.path.join(out, "state_dict.pt"))
    with open(os.path.join(out, "keys.txt"), "w") as file:
        file.write("\n".join(f"{key} {tuple(value.shape) if hasattr(value, 'shape') else type(value).__name__}"
                             for key, value in state.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] == ["zarr"])
