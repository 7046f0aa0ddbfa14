"""Builds tiny ``MegatronGPTModel``s with NeMo 2.4.1 itself on CPU, adds LoRA the way NeMo 1.x fine-tuning does
(``model.add_adapter(PEFT_CONFIG_MAP["lora"](cfg))``, megatron_gpt_finetuning.py with ``peft_scheme=lora``) and
saves the adapter-only ``.nemo`` with NeMo's own ``save_to``.

Run as a script with NeMo 2.4.1, megatron-core 0.13.1 and NeMo's imports on PYTHONPATH:
``python nemo_lora_writer.py OUT_DIR TOKENIZER_MODEL``. Reads ``OUT_DIR/input_ids.pt``; writes, per base model
(``nemotron``: layernorm1p, squared-ReLU, GQA, kv_channels 24 != hidden / heads 16, partial RoPE; ``llama``:
RMSNorm, fast-swiglu, GQA), ``OUT_DIR/<model>_base.nemo`` (the base weights, legacy ``model_weights.ckpt``),
``<model>_base_logits.pt`` and, per adapter, ``<adapter>.nemo`` + ``<adapter>_logits.pt`` (megatron-core's fp32
forward with the adapter, first 320 vocabulary columns). Exits 77 when NeMo is not importable.

Stand-ins, none on the save path, as in tests/checkpoint/nemo_save_writer.py: apex's gate lifted, the local
(no-TE) layer spec, no NGC JIT flags, one gloo rank. megatron-core's torch LayerNorm refuses zero-centred gamma
(layernorm1p); it is given a LayerNorm that adds the 1 itself, which is what apex's FusedLayerNorm computes.
"""

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

VOCAB, SEQ = 320, 64
BASE = {
    "nemotron": dict(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                     kv_channels=24, normalization="layernorm1p", activation="squared-relu", rotary_percentage=0.5),
    "llama": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  normalization="rmsnorm", activation="fast-swiglu", rotary_percentage=1.0),
}
# name -> (base model, lora_tuning fields)
ADAPTERS = {
    "nemotron_all": ("nemotron", dict(target_modules=["all"], adapter_dim=4, alpha=8)),
    "nemotron_qkv_layer2": ("nemotron", dict(target_modules=["attention_qkv", "mlp_fc2"], adapter_dim=2, alpha=5,
                                             layer_selection=[2])),
    "nemotron_canonical_mlp": ("nemotron", dict(target_modules=["mlp"], adapter_dim=4, alpha=4, variant="canonical")),
    "llama_all": ("llama", dict(target_modules=["attention", "mlp"], adapter_dim=8, alpha=16)),
    "llama_canonical": ("llama", dict(target_modules=["all"], adapter_dim=4, alpha=2, variant="canonical")),
}


# Packages NeMo 2.4.1 imports at module level for tokenizers and datasets the writer never touches (Chinese
# segmentation, MT detokenizers, YouTokenToMe); when they are not installed they are empty stand-ins.
ABSENT = ("jieba", "opencc", "pangu", "sacremoses", "youtokentome")


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in ABSENT:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _AbsentModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def config(tokenizer: str, base: str, lora: dict | None = None):
    from omegaconf import OmegaConf

    cfg = {
        "mcore_gpt": True, "precision": 32, "micro_batch_size": 1, "global_batch_size": 1,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "encoder_seq_length": SEQ,
        "max_position_embeddings": SEQ, "seq_length": SEQ, "init_method_std": 0.02, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "ffn_dropout": 0.0, "layernorm_epsilon": 1e-5, "bias": False,
        "position_embedding_type": "rope", "rotary_base": 10000, "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 128, "use_cpu_initialization": True, "transformer_engine": False,
        "megatron_amp_O2": False, "bias_activation_fusion": False, "bias_dropout_add_fusion": False,
        "masked_softmax_fusion": False, "apply_rope_fusion": False, "persist_layer_norm": False,
        "gradient_accumulation_fusion": False, "seed": 1234,
        "tokenizer": {"library": "sentencepiece", "type": None, "model": tokenizer, "vocab_file": None,
                      "merge_file": None, "delimiter": None, "sentencepiece_legacy": False},
        "optim": {"name": "adam", "lr": 1e-4}, "data": {}, **BASE[base],
    }
    if lora is not None:  # what megatron_gpt_finetuning.yaml's model.peft holds
        cfg["peft"] = {"peft_scheme": "lora", "restore_from_path": None, "lora_tuning": {
            "variant": "nemo", "target_modules": ["attention_qkv"], "adapter_dim": 32, "alpha": None,
            "adapter_dropout": 0.0, "column_init_method": "xavier", "row_init_method": "zero",
            "layer_selection": None, "weight_tying": False, "position_embedding_strategy": None, **lora}}
    return OmegaConf.create(cfg)


class LayerNorm1P(torch.nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def stand_ins() -> None:
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: "cpu"
    import nemo.collections.nlp.models.language_modeling.megatron_gpt_model as gpt_module
    import nemo.collections.nlp.modules.common.megatron.build_model as build_module
    import nemo.collections.nlp.parts.nlp_overrides as overrides
    from megatron.core import tensor_parallel
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    overrides.HAVE_APEX = True
    build_module.set_defaults_if_not_set_tensor_model_parallel_attributes = \
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes
    gpt_module.get_specs = lambda spec_name, *args, **kwargs: gpt_module.get_gpt_layer_local_spec(None, False)
    MegatronBaseModel._enable_nvidia_optimizations = lambda self: None
    torch_norm = WrappedTorchNorm.__new__

    def norm(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if config.layernorm_zero_centered_gamma:
            return LayerNorm1P(hidden_size, eps=eps)
        return torch_norm(cls, config, hidden_size, eps, *args, **kwargs)

    WrappedTorchNorm.__new__ = norm
    megatron_core_013_interface()

    class NoRngTracker:  # the CUDA RNG tracker only seeds dropout (0 here, eval mode)
        fork = staticmethod(contextlib.nullcontext)

    tensor_parallel.get_cuda_rng_tracker = lambda *args, **kwargs: NoRngTracker()


def megatron_core_013_interface() -> None:
    """NeMo 2.4.1's LoRA attention mixin still speaks megatron-core 0.11's attention interface: the layer now
    passes ``inference_context`` (was ``inference_params``) and ``_adjust_key_value_for_inference`` returns a
    sixth value (the paged KV cache's block table, None without inference). Both only concern generation with a
    KV cache; the LoRA arithmetic (get_query_key_value_tensors, linear_proj) is NeMo's code as it is."""
    from megatron.core.transformer.attention import Attention
    from nemo.collections.nlp.modules.common.megatron.adapters.mcore_mixins import MCoreSelfAttentionMixin

    forward = MCoreSelfAttentionMixin.forward

    def renamed(self, hidden_states, attention_mask, key_value_states=None, inference_context=None, **kwargs):
        return forward(self, hidden_states, attention_mask, key_value_states, inference_context, **kwargs)

    def adjust(self, *args, **kwargs):
        return Attention._adjust_key_value_for_inference(self, *args, **kwargs)[:5]

    MCoreSelfAttentionMixin.forward = renamed
    MCoreSelfAttentionMixin._adjust_key_value_for_inference = adjust


def build(cfg, trainer):
    # megatron_gpt_finetuning.py fine-tunes a MegatronGPTSFTModel: MegatronGPTModel with NeMo's adapter mixin
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel

    model = MegatronGPTSFTModel(cfg, trainer).eval()
    generator = torch.Generator().manual_seed(1234)  # the same base weights for every adapter
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = torch.randn(param.shape, generator=generator) * (0.3 if "norm" in name else 0.08)
            param.copy_((value + (0 if "layernorm1p" == cfg.normalization or "norm" not in name else 1)).float())
    return model


def logits(model, input_ids):
    length = input_ids.shape[1]
    position_ids = torch.arange(length).unsqueeze(0).expand_as(input_ids)
    causal = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)  # True = masked
    with torch.no_grad():
        return model.model(input_ids, position_ids, causal)[..., :VOCAB].float().contiguous()


def main(out: str, tokenizer: str) -> None:
    # transformers 4.53 imports the optional ``kernels`` package when it is installed, and the system's release
    # needs a newer huggingface_hub than NeMo's; NeMo never uses it.
    sys.modules.setdefault("kernels", None)
    sys.meta_path.append(_AbsentFinder())  # last: an installed package wins
    try:
        from lightning.pytorch import Trainer
        from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy
        from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP
    except ImportError as error:
        print(error)
        sys.exit(77)
    from megatron.core import parallel_state
    from omegaconf import open_dict

    stand_ins()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=NLPDDPStrategy(process_group_backend="gloo"),
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)
    input_ids = torch.load(os.path.join(out, "input_ids.pt"))
    only = set(sys.argv[3:])
    for base in BASE:
        model = build(config(tokenizer, base), trainer)
        torch.save(logits(model, input_ids), os.path.join(out, f"{base}_base_logits.pt"))
        with open_dict(model.cfg):
            model.cfg.fsdp = True  # NLPSaveRestoreConnector's non-distributed path: model_weights.ckpt
        model.save_to(os.path.join(out, f"{base}_base.nemo"))
    for index, (name, (base, lora)) in enumerate(ADAPTERS.items()):
        if only and name not in only:
            continue
        cfg = config(tokenizer, base, lora)
        model = build(cfg, trainer)
        model.add_adapter(PEFT_CONFIG_MAP["lora"](cfg))
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():  # trained-looking adapters: linear_out starts at zero
            for key, param in model.named_parameters():
                if "adapter" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        torch.save(logits(model, input_ids), os.path.join(out, f"{name}_logits.pt"))
        model.setup_complete = True  # what training's setup() sets: state_dict() is then the adapters' alone
        model.save_to(os.path.join(out, f"{name}.nemo"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
