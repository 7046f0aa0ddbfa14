"""Tensor and pipeline parallelism on torch.distributed (see groups.py, tensor.py, runner.py)."""
