"""The same numbers, faster, on CUDA: the whole training step captured once in a CUDA graph and replayed.

Read minigpt/training.py first: its `training_step(x, y)` is forward, backward, gradient clipping and
AdamW, one Python call per kernel. On a GPU at MiniGPT's sizes that is hundreds of small kernels a
step, and the host (Python, dispatch, ~tens of µs per launch) is slower than the GPU: a 1k-token LoRA
step measured 23 ms of wall time for 3.4 ms of kernels on an H200 (docs/benchmarks.md). A CUDA graph
records every kernel of one step once; each later step is one `graph.replay()`, which the host
issues in microseconds, and the GPU runs the recorded kernels back to back.

    step 1 .. warmup_steps   eager, on a side stream: cuBLAS workspaces, AdamW's states, Triton
                             kernels are created here, as a graph may not allocate them later
    next step                capture: run `training_step(static_x, static_y)` once with recording on
                             (nothing executes), then replay it on the real batch
    every later step         copy the batch into static_x, static_y; replay; read the captured loss

What a replay can and cannot change (the rules of torch.cuda.graphs):
- every tensor keeps its address: the batch is copied into the captured inputs, the loss is the same
  tensor each step (overwritten by every replay), and the gradients live in the graph's own memory;
- shapes are fixed: every batch must have the captured batch's shape (train_model's batches do);
- Python values are read once, at capture: so the learning rate lives in a tensor that the scheduler
  fills before each replay (`torch.optim.lr_scheduler` fills tensor rates in place), and AdamW runs
  with `capturable=True` (its step count and bias corrections on the GPU, not in Python floats);
- nothing in the step may wait for the GPU (no `.item()`, no data-dependent Python `if`): a step that
  does raises at capture, and the error says to use compile="forward" or "off".

Numbers: the replayed kernels are the eager step's kernels, so a replay computes what the eager step
would. One difference remains: `capturable=True` AdamW forms its bias corrections on the GPU in float32
rather than in Python's float64, a change in the last bits of the update (tests/minigpt/test_cuda_graph_cuda.py
compares the losses of the two over a few steps).
"""

import torch

__all__ = ["CUDAGraphStep", "check_graphable_optimizer"]

GRAPHABLE_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam)  # capturable=True, tensor learning rates


def check_graphable_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError unless a CUDA graph can replay `optimizer.step()` (torch's Adam / AdamW).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> check_graphable_optimizer(torch.optim.AdamW(model.parameters()))
        >>> check_graphable_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        Traceback (most recent call last):
        ...
        ValueError: compile="graph" needs torch.optim.AdamW or Adam, got SGD; use compile="forward" or "off"
    """
    if not isinstance(optimizer, GRAPHABLE_OPTIMIZERS):
        raise ValueError(f'compile="graph" needs torch.optim.AdamW or Adam, got {type(optimizer).__name__}; '
                         f'use compile="forward" or "off"')  # only their capturable mode replays in a graph


class CUDAGraphStep:
    """`graphed(x, y)` does what `training_step(x, y)` does, after `warmup_steps` calls as a graph replay.

    Args:
        training_step: `training_step(x, y) -> loss`, one whole optimizer step (zero_grad, forward,
            backward, clipping, optimizer.step()) touching only the GPU: see the module docstring.
        optimizer: the torch.optim.AdamW / Adam that `training_step` steps. It is switched to
            `capturable=True` and its learning rates become 0-d tensors on the GPU (a scheduler built
            before keeps working: it fills them in place).
        warmup_steps: eager steps before the capture (PyTorch's recipe uses 3).

    Returns, per call: the loss tensor (the captured one after the warm-up: read it before the next call).

    Attributes: `replays` (steps run from the graph), `captures` (0 or 1: a graph is recorded once).
    """

    def __init__(self, training_step, optimizer: torch.optim.Optimizer, warmup_steps: int = 3):
        check_graphable_optimizer(optimizer)
        device = next(p.device for group in optimizer.param_groups for p in group["params"])
        if device.type != "cuda":
            raise ValueError(f'compile="graph" replays a CUDA graph, so the model must be on a CUDA GPU; it is on '
                             f'{device.type}: use compile="forward" or "off" there')
        for group in optimizer.param_groups:
            group["capturable"] = True  # the step count and bias corrections stay on the GPU
            if not torch.is_tensor(group["lr"]):  # a rate the scheduler fills in place before each replay
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.training_step, self.optimizer, self.warmup_steps = training_step, optimizer, warmup_steps
        self.graph = None
        self.static_x = self.static_y = self.static_loss = None
        self.eager_steps = self.replays = self.captures = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.graph is None and self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            return self._eager_on_side_stream(x, y)
        if self.graph is None:
            self._capture(x, y)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            raise ValueError(f'compile="graph": every batch must have the captured shape {tuple(self.static_x.shape)}, '
                             f'got {tuple(x.shape)}; use compile="forward" or "off" for batches of varying shape')
        self.static_x.copy_(x)  # (B, T) into the captured input's memory
        self.static_y.copy_(y)
        self.graph.replay()  # the whole step: one launch from the host
        self.replays += 1
        return self.static_loss

    def _eager_on_side_stream(self, x, y):
        # subtle: PyTorch's recipe warms up on a side stream, so that what the first steps create lazily
        # (cuBLAS handles, AdamW's states, autotuned kernels) is not tied to the stream the capture uses
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.training_step(x, y)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, x, y):
        self.static_x, self.static_y = x.clone(), y.clone()  # (B, T): the addresses every replay reads
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_loss = self.training_step(self.static_x, self.static_y)  # recorded, not run
        except Exception as error:
            raise RuntimeError(f'compile="graph": this training step cannot be captured in a CUDA graph '
                               f'({type(error).__name__}: {error}); use compile="forward" or "off"') from error
        self.graph, self.captures = graph, self.captures + 1

    def close(self) -> None:
        """Drop the graph and the gradients in its memory (call when training ends)."""
        self.graph = self.static_x = self.static_y = self.static_loss = None
        self.optimizer.zero_grad(set_to_none=True)
