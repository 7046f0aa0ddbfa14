"""Builds a tiny Llama-style ``MegatronGPTModel`` with NeMo 2.5.0 itself on CPU and saves it with NeMo's own
``save_to``: ``torch_dist`` and ``zarr`` in fp32 and bf16, and the legacy ``model_weights.ckpt``.

Run as a script (megatron's writer starts processes that import ``__main__``) with NeMo 2.5.0, its
imports and megatron-core 0.14 (with zarr 2) on PYTHONPATH: ``python nemo_save_writer.py OUT_DIR
TOKENIZER_MODEL``. Reads ``OUT_DIR/input_ids.pt``; writes ``OUT_DIR/logits.pt`` (megatron-core's fp32
forward, first 320 vocabulary columns) and ``OUT_DIR/<layout>.nemo``. Weights are rounded to bf16 first,
so the bf16 checkpoints hold the very weights of that forward. Exits 77 when NeMo is not importable.

Stand-ins, none on the save path: apex and Transformer Engine are CUDA-only, so NeMo's gate on apex is
lifted and its apex copy of a megatron-core helper is pointed back at megatron-core; the local (no-TE)
layer spec is built alone, since ``get_specs`` builds the TE specs eagerly; the NGC-container JIT flags
are skipped; and the model-parallel state that ``NLPDDPStrategy`` sets up at fit time is set up on one
gloo rank.
"""

import contextlib
import os
import sys

import torch
import torch.distributed as dist

VOCAB, SEQ = 320, 64


def config(tokenizer: str):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "mcore_gpt": True, "precision": 32, "micro_batch_size": 1, "global_batch_size": 1,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "encoder_seq_length": SEQ,
        "max_position_embeddings": SEQ, "seq_length": SEQ, "num_layers": 2, "hidden_size": 64,
        "ffn_hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2, "init_method_std": 0.02,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "ffn_dropout": 0.0, "normalization": "rmsnorm",
        "layernorm_epsilon": 1e-5, "bias": False, "activation": "fast-swiglu", "position_embedding_type": "rope",
        "rotary_percentage": 1.0, "rotary_base": 10000, "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 128, "use_cpu_initialization": True, "transformer_engine": False,
        "megatron_amp_O2": False, "bias_activation_fusion": False, "bias_dropout_add_fusion": False,
        "masked_softmax_fusion": False, "apply_rope_fusion": False, "persist_layer_norm": False,
        "gradient_accumulation_fusion": False, "dist_ckpt_format": "torch_dist", "seed": 1234,
        "tokenizer": {"library": "sentencepiece", "type": None, "model": tokenizer, "vocab_file": None,
                      "merge_file": None, "delimiter": None, "sentencepiece_legacy": False},
        "optim": {"name": "adam", "lr": 1e-4},
    })


def stand_ins() -> None:
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: "cpu"
    import nemo.collections.nlp.models.language_modeling.megatron_gpt_model as gpt_module
    import nemo.collections.nlp.modules.common.megatron.build_model as build_module
    import nemo.collections.nlp.parts.nlp_overrides as overrides
    from megatron.core import tensor_parallel
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    overrides.HAVE_APEX = True
    build_module.set_defaults_if_not_set_tensor_model_parallel_attributes = \
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes
    gpt_module.get_specs = lambda spec_name, *args, **kwargs: gpt_module.get_gpt_layer_local_spec(None, False)
    MegatronBaseModel._enable_nvidia_optimizations = lambda self: None

    class NoRngTracker:  # the CUDA RNG tracker only seeds dropout (0 here, eval mode)
        fork = staticmethod(contextlib.nullcontext)

    tensor_parallel.get_cuda_rng_tracker = lambda *args, **kwargs: NoRngTracker()


def main(out: str, tokenizer: str) -> None:
    # transformers 4.53 imports the optional ``kernels`` package when it is installed, and the release the test
    # environment has (for transformers 5) needs a newer huggingface_hub than NeMo's: NeMo then failed to import
    # and every test of this writer skipped.
    sys.modules.setdefault("kernels", None)
    try:
        from lightning.pytorch import Trainer
        from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
        from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy
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
    model = MegatronGPTModel(config(tokenizer), trainer).eval()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = torch.randn(param.shape, generator=generator) * (0.3 if "norm" in name else 0.08)
            param.copy_((value + 1 if "norm" in name else value).bfloat16().float())
        input_ids = torch.load(os.path.join(out, "input_ids.pt"))
        length = input_ids.shape[1]
        position_ids = torch.arange(length).unsqueeze(0).expand_as(input_ids)
        causal = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)  # True = masked
        logits = model.model(input_ids, position_ids, causal)
    torch.save(logits[..., :VOCAB].float().contiguous(), os.path.join(out, "logits.pt"))

    def save(name: str, **fields) -> None:
        with open_dict(model.cfg):
            model.cfg.update(fields)
        model.save_to(os.path.join(out, f"{name}.nemo"))

    save("torch_dist_fp32")
    save("zarr_fp32", dist_ckpt_format="zarr")
    save("legacy_fp32", fsdp=True)  # NLPSaveRestoreConnector's non-distributed path: model_weights.ckpt
    model.model.to(torch.bfloat16)  # what megatron_amp_O2 holds
    save("torch_dist_bf16", fsdp=False, dist_ckpt_format="torch_dist", precision="bf16")
    save("zarr_bf16", dist_ckpt_format="zarr")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
