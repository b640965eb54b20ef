"""Runs at the start of every process that has this folder on PYTHONPATH (the tests' NPU subprocesses).

Real torch_npu loads only beside a CPU build of torch, and the NPU backend refuses a CUDA build
before importing it. The double is plain Python and runs beside either build, so here torch
reports itself as a CPU build: the NPU tests then pass whichever torch pip installed.
"""

import torch

torch.backends.cuda.is_built = lambda: False
