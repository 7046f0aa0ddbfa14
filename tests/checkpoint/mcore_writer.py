"""Writes a tiny Megatron-core distributed checkpoint with megatron-core's own ``dist_checkpointing.save``.

Run as a script (megatron's async writer needs an importable ``__main__``):
``python mcore_writer.py OUT_DIR torch_dist|zarr``. Saves the expected tensors to ``OUT_DIR/../expected.pt``.
Exits 77 when megatron-core (or, for zarr, its zarr strategy) is unavailable.
"""

import io
import os
import sys

import torch
import torch.distributed as dist

LAYERS, TP = 3, 2


def main(out: str, backend: str) -> None:
    try:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    except ImportError:
        sys.exit(77)
    from mcore_cpu import megatron_on_cpu  # beside this script

    megatron_on_cpu()
    torch.manual_seed(0)
    qkv = torch.randn(LAYERS, 12, 8).bfloat16()  # stacked layers, split in two along dim 1 like TP=2
    norm = torch.randn(LAYERS, 8)
    emb = torch.randn(10, 8)
    sd = {"emb": ShardedTensor.from_rank_offsets("model.embedding.word_embeddings.weight", emb, replica_id=0)}
    for i in range(LAYERS):
        for t, part in enumerate(qkv[i].chunk(TP, dim=0)):
            sd[f"qkv{i}.{t}"] = ShardedTensor.from_rank_offsets(
                "model.decoder.layers.self_attention.linear_qkv.weight", part.clone(), (0, i, LAYERS), (1, t, TP),
                replica_id=0, prepend_axis_num=1)
        sd[f"norm{i}"] = ShardedTensor.from_rank_offsets(
            "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight", norm[i].clone(), (0, i, LAYERS),
            replica_id=0, prepend_axis_num=1)
    sd["extra"] = ShardedObject("model.decoder.layers.self_attention.core_attention._extra_state",
                                io.BytesIO(b"extra"), (1,), (0,), replica_id=0)
    os.makedirs(out)
    try:
        if backend == "zarr":
            dist_checkpointing.save(sd, out, sharded_strategy=("zarr", 1))
        else:
            dist_checkpointing.save(sd, out)
    except Exception as error:
        if backend == "zarr" and "strategy" in str(error):
            print(error)
            sys.exit(77)
        raise
    torch.save({"model.embedding.word_embeddings.weight": emb,
                "model.decoder.layers.self_attention.linear_qkv.weight": qkv,
                "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight": norm},
               os.path.join(out, "..", "expected.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
