"""Writes NeMo 2 PEFT (LoRA) checkpoints with NeMo 2.4.1's own code on CPU, for test_nemo2_lora.py.

Run as a script with NeMo 2.4.1, megatron-core 0.13.1 and NeMo's imports on PYTHONPATH:
``python nemo2_lora_writer.py OUT_DIR TOKENIZER_MODEL [ADAPTER ...]``. Reads ``OUT_DIR/input_ids.pt``. Per base
model of nemo_lora_writer.BASE it builds NeMo 1's MegatronGPTModel (nemo_lora_writer.build, the same base
weights) and saves it as ``<model>_base.nemo`` (a model nemolite loads) with ``<model>_base_logits.pt``; then
builds NeMo 2's ``llm.GPTModel`` of the same architecture, loads those weights into its megatron-core module, and
per adapter applies ``llm.peft.LoRA`` / ``CanonicalLoRA`` the way ``llm.finetune`` does (``_set_with_io(model,
"model_transform", peft)``, then ``peft(model)``), randomizes the adapter weights and saves what the PEFT callback
saves: ``WrappedAdapterIO(MegatronCheckpointIO()).save_checkpoint`` of MegatronStrategy's checkpoint dict
(``<adapter>/weights/``: torch_dist tensors, common.pt, metadata.json, adapter_metadata.json) and
``TrainerContext.io_dump`` (``<adapter>/context/io.json``), as ModelCheckpoint does. ``<adapter>_logits.pt``:
megatron-core's fp32 forward with the adapter (first VOCAB columns). Exits 77 when NeMo is not importable.

Stand-ins (none on the save path): nemo_lora_writer's (local layer spec, no CUDA, one gloo rank, LayerNorm1P);
the context's YAML copy (model.yaml) needs nemo_run, which is not installed, so only io.json is written.
"""

import os
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import nemo_lora_writer as v1  # noqa: E402

# What nemo.collections.llm imports at module level for features the writer never uses (NVRx local checkpoints
# and fault tolerance, TensorStore for export to TensorRT-LLM and zarr); empty stand-ins when not installed, as
# nemo_lora_writer.ABSENT. The save path is torch_dist, which needs neither.
# megatron-core's zarr strategy must see TensorStore missing (it registers numpy bfloat16 through it), so it is
# imported before the stand-ins go in.
NEMO2_ABSENT = ("nvidia_resiliency_ext", "tensorstore", "modelopt")
# name -> (base model, peft class, its fields)
ADAPTERS = {
    "nemotron_lora": ("nemotron", "LoRA", dict(dim=4, alpha=8)),
    "nemotron_qkv_fc2": ("nemotron", "LoRA", dict(target_modules=["linear_qkv", "linear_fc2"], dim=2, alpha=5)),
    "llama_lora": ("llama", "LoRA", dict(dim=8, alpha=16)),
    "llama_canonical": ("llama", "CanonicalLoRA", dict(dim=4, alpha=2)),
}


def _decorator(*args, **kwargs):
    """``@run.cli.factory``, ``@run.cli.factory(target=...)``, ``@run.autoconvert``: the function unchanged."""
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn


def nemo_run_stand_in() -> None:
    """nemo.collections.llm imports NeMo-Run (recipes, CLI factories, executors) at module level, and NeMo-Run
    pulls in every executor's SDK. Where it is not installed, a stand-in: its Config and Partial are fiddle's
    (which NeMo-Run's subclass), its decorators return the function. None of it is on the save path."""
    import fiddle as fdl

    try:
        import nemo_run  # noqa: F401
        return
    except ImportError:
        pass
    run = types.ModuleType("nemo_run")
    run.__path__ = []
    run.Config, run.Partial, run.autoconvert, run.factory = fdl.Config, fdl.Partial, _decorator, _decorator
    run.cli = types.SimpleNamespace(factory=_decorator, entrypoint=_decorator)
    sys.modules["nemo_run"] = run

    def attribute(name):  # Executor, Plugin, Script...: annotations only
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})

    run.__getattr__ = attribute


def nemo2_config(base: str, vocab_size: int):
    import torch.nn.functional as F
    from nemo.collections.llm.fn.activation import squared_relu
    from nemo.collections import llm

    fields = v1.BASE[base]
    common = dict(num_layers=fields["num_layers"], hidden_size=fields["hidden_size"],
                  ffn_hidden_size=fields["ffn_hidden_size"], num_attention_heads=fields["num_attention_heads"],
                  num_query_groups=fields["num_query_groups"], seq_length=v1.SEQ, vocab_size=vocab_size,
                  init_method_std=0.02, layernorm_epsilon=1e-5, add_bias_linear=False, rotary_base=10000,
                  rotary_percent=fields["rotary_percentage"], position_embedding_type="rope",
                  share_embeddings_and_output_weights=False, use_cpu_initialization=True,
                  hidden_dropout=0.0, attention_dropout=0.0, masked_softmax_fusion=False, apply_rope_fusion=False,
                  persist_layer_norm=False, bias_activation_fusion=False, bias_dropout_fusion=False,
                  gradient_accumulation_fusion=False, cross_entropy_loss_fusion=False, params_dtype=torch.float32)
    if base == "nemotron":
        return llm.NemotronConfig(kv_channels=fields["kv_channels"], activation_func=squared_relu,
                                  normalization="LayerNorm", layernorm_zero_centered_gamma=True, **common)
    return llm.GPTConfig(normalization="RMSNorm", activation_func=F.silu, gated_linear_unit=True, **common)


def nemo2_model(base: str, weights: dict):
    from nemo.collections import llm

    vocab = weights["embedding.word_embeddings.weight"].shape[0]
    cls = llm.NemotronModel if base == "nemotron" else llm.GPTModel
    model = cls(nemo2_config(base, vocab))
    model.configure_model()
    missing, unexpected = model.module.load_state_dict(weights, strict=False)
    assert not unexpected and all(key.endswith("_extra_state") for key in missing), (missing, unexpected)
    return model.eval()


def forward(module, input_ids):
    length = input_ids.shape[1]
    position_ids = torch.arange(length).unsqueeze(0).expand_as(input_ids)
    causal = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        return module(input_ids, position_ids, causal)[..., :v1.VOCAB].float().contiguous()


def save_adapter(model, peft, trainer, path: Path, base_path: str) -> None:
    """What ModelCheckpoint + MegatronStrategy + the PEFT callback write for a PEFT checkpoint."""
    from nemo.lightning.io.pl import MegatronCheckpointIO, TrainerContext
    from nemo.lightning.megatron_parallel import MegatronParallel
    from nemo.lightning.pytorch.callbacks.peft import WrappedAdapterIO

    peft.params_to_save = set()  # PEFT.set_params_to_save: the trainable ones, here all have ".adapter."
    parallel = MegatronParallel([model], cpu=True)
    checkpoint = {"state_dict": {}, "sharded_state_dict": parallel.sharded_state_dict(), "global_step": 0}
    io = WrappedAdapterIO(MegatronCheckpointIO(), peft=peft)
    io.model_ckpt_path = Path(base_path)
    io.save_checkpoint(checkpoint, path)
    try:
        TrainerContext.from_trainer(trainer).io_dump(path / "context", yaml_attrs=["model"])
    except ModuleNotFoundError as error:  # model.yaml needs the real NeMo-Run; io.json is written by then
        assert error.name.startswith("nemo_run") and (path / "context" / "io.json").is_file(), error


def main(out: str, tokenizer: str) -> None:
    sys.modules.setdefault("kernels", None)
    import lightning.pytorch
    import megatron.core.dist_checkpointing.strategies.zarr  # noqa: F401

    # nemo.collections.llm's reranker imports the standalone pytorch_lightning: the same code as lightning.pytorch
    sys.modules.setdefault("pytorch_lightning", lightning.pytorch)

    v1.ABSENT += NEMO2_ABSENT
    sys.meta_path.append(v1._AbsentFinder())
    try:
        nemo_run_stand_in()
        from lightning.pytorch import Trainer
        from nemo import lightning as nl
        from nemo.collections import llm
        from nemo.collections.llm.api import _set_with_io
        from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy
    except ImportError as error:
        print(error)
        sys.exit(77)
    from megatron.core import parallel_state
    from omegaconf import open_dict

    v1.stand_ins()
    # LoRA.transform compares each module's class with transformer_engine's te.Linear even without TE (NeMo
    # 2.4.1 assumes it installed); without TE, a class no module is, so megatron's Column/RowParallelLinear get
    # ParallelLinearAdapter as they would on a TE-less GPU install.
    # peft/utils.py's HAVE_TE only asks megatron-core's TE extension module, which imports without TE too.
    import nemo.collections.llm.peft.lora as lora_module
    import nemo.collections.llm.peft.utils as peft_utils

    if not lora_module.HAVE_TE:
        lora_module.te = types.SimpleNamespace(Linear=type("NoTELinear", (), {}))
        peft_utils.HAVE_TE = False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=NLPDDPStrategy(process_group_backend="gloo"),
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)
    # what a NeMo 2 recipe's trainer is (never run: the writer calls the save path itself)
    nemo2_trainer = nl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               strategy=nl.MegatronStrategy(tensor_model_parallel_size=1, ckpt_load_optimizer=False))
    input_ids = torch.load(os.path.join(out, "input_ids.pt"))
    only = set(sys.argv[3:])
    for base in v1.BASE:
        names = [name for name, spec in ADAPTERS.items() if spec[0] == base and (not only or name in only)]
        if not names:
            continue
        nemo1 = v1.build(v1.config(tokenizer, base), trainer)
        base_logits = v1.logits(nemo1, input_ids)
        torch.save(base_logits, os.path.join(out, f"{base}_base_logits.pt"))
        with open_dict(nemo1.cfg):
            nemo1.cfg.fsdp = True  # NLPSaveRestoreConnector's non-distributed path: model_weights.ckpt
        nemo1.save_to(os.path.join(out, f"{base}_base.nemo"))
        weights = {key: value.clone() for key, value in nemo1.model.state_dict().items() if value is not None}
        assert (forward(nemo2_model(base, weights).module, input_ids) - base_logits).abs().max() < 1e-4
        for name in names:
            _, kind, fields = ADAPTERS[name]
            model = nemo2_model(base, weights)
            model.trainer = nemo2_trainer  # the context saves the trainer too, as ModelCheckpoint does
            nemo2_trainer.strategy._lightning_module = model
            peft = getattr(llm.peft, kind)(**fields)
            _set_with_io(model, "model_transform", peft)  # llm.finetune's _setup: the LoRA goes into the context
            peft(model)
            generator = torch.Generator().manual_seed(sorted(ADAPTERS).index(name) + 200)
            with torch.no_grad():  # trained-looking adapters: linear_out starts at zero
                for key, param in model.named_parameters():
                    if ".adapter." in key:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            torch.save(forward(model.module, input_ids), os.path.join(out, f"{name}_logits.pt"))
            save_adapter(model, peft, nemo2_trainer, Path(out) / name, os.path.join(out, f"{base}_base"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
