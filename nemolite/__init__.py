"""nemolite: run NVIDIA's Nemotron models with pip and PyTorch alone."""

from nemolite.engine.llm import LLM
from nemolite.engine.outputs import CompletionOutput, Logprob, RequestOutput
from nemolite.engine.sampling_params import SamplingParams
from nemolite.errors import NemoliteError
from nemolite.lora.request import LoRARequest
from nemolite.nemo_query import NemoQuery, NemoQueryLLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "LoRARequest", "RequestOutput", "CompletionOutput", "Logprob", "NemoliteError",
           "NemoQuery", "NemoQueryLLM"]
