"""The stateful half of pruning: a model streamed block by block, and the sequential loop.

Memory model. The model is built from its config with every *parameter* on the
meta device (buffers such as RoPE frequencies stay real). The "stem"
(embeddings, norms, patch embedding, lm_head) is loaded once; each block (a
vision layer, the projector, a language-model layer) is materialised from the
safetensors shards right before it runs and put back on meta right after.
Pruned blocks are re-materialised with their masks applied, so any later
forward sees the pruned model. Resident: the stem, one block, the calibration
activations and one bit per pruned weight.

The loop (one for both towers, llm-compressor style), per tower:

1. capture: run the model's own forward with the tower's blocks replaced by
   recording stubs; this yields each sample's input to the tower's first block
   (computed through the already-pruned earlier towers) and every block's
   other call arguments (masks, position embeddings, window ``cu_seqlens``);
2. per block: materialise, "(k/n) Calibrating" with hooks feeding every
   Linear's input to the method's statistics (Wanda: ``||X_j||^2``), prune
   (``vlsparse.compress.methods``: Wanda per row or N:M), re-run the
   pruned block so the next block sees pruned outputs, release.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlsparse.compress.checkpoint import CheckpointReader
from vlsparse.compress.packed import pack_mask, unpack_mask
from vlsparse.compress.methods.wanda import new_stats as sq_norm_stats
from vlsparse.errors import ModelLoadError
from vlsparse.phases import Phases

Progress = Callable[[str], None]


@dataclass
class Block:
    """One allocation group: a transformer layer of either tower, or the projector."""

    name: str  # "vision.3", "projector", "lm.17"
    tower: str  # "vision", "projector" or "lm"
    prefix: str  # qualified module name in the model
    module: nn.Module
    linears: dict[str, nn.Linear] = field(default_factory=dict)  # qualified module name -> Linear

    def weight_names(self) -> list[str]:
        return [f"{name}.weight" for name in self.linears]

    def size(self) -> int:
        return sum(lin.weight.numel() for lin in self.linears.values())


# ----------------------------------------------------------------------------- skeleton


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, every registered parameter is moved to the meta device; buffers stay real.

    (The technique of ``accelerate.init_empty_weights(include_buffers=False)``.)
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(folder, family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``folder`` with parameters on meta (no weights read)."""
    from transformers import AutoConfig

    from vlsparse.models.loading import model_class

    try:
        config = AutoConfig.from_pretrained(folder)
        with parameters_on_meta():
            model = model_class(family).from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot build the model of {folder}: {str(exc).splitlines()[0][:200]}",
                             "check config.json") from exc
    return model.eval().requires_grad_(False)


def model_key_map(model: nn.Module, checkpoint_keys: list[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key, by transformers' own load-time renaming
    (e.g. LLaVA's ``language_model.model.layers.0...`` -> ``model.language_model.layers.0...``)."""
    from vlsparse.compat import NeedsConversion, checkpoint_key_map

    try:
        return checkpoint_key_map(model, checkpoint_keys)
    except NeedsConversion as exc:
        raise ModelLoadError(f"checkpoint tensor {exc} needs a conversion (fusing/splitting) on load",
                             "this layout is not supported for streamed pruning") from exc


def find_blocks(model: nn.Module, adapter) -> list[Block]:
    """Vision layers, the projector and the language-model layers, in execution order."""
    names = {id(m): n for n, m in model.named_modules()}
    blocks: list[Block] = []

    def add(name: str, tower: str, module: nn.Module) -> None:
        prefix = names[id(module)]
        linears = {f"{prefix}.{n}" if n else prefix: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
        blocks.append(Block(name, tower, prefix, module, linears))

    for i, layer in enumerate(adapter.vision_layers()):
        add(f"vision.{i}", "vision", layer)
    projector = adapter.projector()
    if projector is not None:
        add("projector", "projector", projector)
    for i, layer in enumerate(adapter.lm_layers()):
        add(f"lm.{i}", "lm", layer)
    return blocks


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if attr in owner._parameters:
        owner._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


# ----------------------------------------------------------------------------- streamed model


@dataclass
class Perturbation:
    """Add ``sign * epsilon * z`` to the prunable weights of block ``block`` (ECoFLaP)."""

    block: str
    sign: float
    epsilon: float
    noise: Callable[[int, tuple[int, ...]], torch.Tensor]  # (weight index, shape) -> z


class StreamedModel:
    """A skeleton model whose blocks are read from disk only while they run."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, blocks: list[Block],
                 dtype: torch.dtype = torch.float32, spill_parent: Path | None = None) -> None:
        self.model = model
        self.reader = reader
        self.blocks = blocks
        self.dtype = dtype
        self.key_of = model_key_map(model, reader.keys())
        self.masks: dict[str, torch.Tensor] = {}  # model weight name -> packed keep bits
        self.spill_parent = spill_parent  # where the folder of updated weights goes (None: the system's temp)
        self.spill: Path | None = None
        self.updated: dict[str, Path] = {}  # model weight name -> safetensors file holding its new value
        self.updated_names: dict[str, str] = {}  # checkpoint key -> model weight name, for the updated ones
        self.perturbation: Perturbation | None = None
        self._block_params = {f"{b.prefix}.{n}" for b in blocks for n, _ in b.module.named_parameters()}
        self._tied = dict(getattr(model, "all_tied_weights_keys", None) or {})

    def _load(self, name: str) -> torch.Tensor:
        key = self.key_of.get(name)
        if key is None:
            raise ModelLoadError(f"the checkpoint has no tensor for {name}", "the weights do not match config.json")
        tensor = self.updated_tensor(name) if name in self.updated else self.reader.tensor(key)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def set_weights(self, block: Block, weights: dict[str, torch.Tensor]) -> None:
        """Keep new values of ``block``'s weights (methods that correct the kept weights) on disk,
        in the checkpoint's dtype; later materialisations, and the written checkpoint, use them."""
        from safetensors.torch import save_file

        if not weights:
            return
        if self.spill is None:
            self.spill = Path(tempfile.mkdtemp(prefix=".vlsparse-updated-", dir=self.spill_parent))
        file = self.spill / f"{block.name}.safetensors"
        dtypes = {name: self.reader.tensor_dtype(self.key_of[name]) for name in weights}
        save_file({name: w.detach().to(dtypes[name]).contiguous() for name, w in weights.items()}, str(file))
        for name in weights:
            self.updated[name] = file
            self.updated_names[self.key_of[name]] = name

    def updated_tensor(self, name: str) -> torch.Tensor:
        """The kept new value of weight ``name`` (checkpoint dtype)."""
        from safetensors import safe_open

        with safe_open(str(self.updated[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def checkpoint_tensor(self, key: str) -> torch.Tensor:
        """Checkpoint tensor ``key`` as the pruned model has it: its new value if a method updated it."""
        name = self.updated_names.get(key)
        return self.updated_tensor(name) if name is not None else self.reader.tensor(key)

    def close(self) -> None:
        """Delete the folder of updated weights (once the checkpoint is written)."""
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)
            self.spill = None
            self.updated, self.updated_names = {}, {}

    def load_stem(self) -> None:
        """Read every parameter outside the blocks (and tie shared weights)."""
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            if name not in self._block_params and name not in self._tied:
                _set_tensor(self.model, name, self._load(name))
        for target, source in self._tied.items():  # e.g. lm_head.weight -> embed_tokens.weight
            _set_tensor(self.model, target, self.model.get_parameter(source))
        for name, buf in self.model.named_buffers():
            if buf.device.type == "meta":
                if name not in self.key_of:
                    raise ModelLoadError(f"buffer {name} is neither computed nor stored", "unsupported model")
                _set_tensor(self.model, name, self._load(name))

    def materialise(self, block: Block) -> None:
        """Read ``block``'s parameters, apply its masks (if pruned) and any perturbation."""
        perturb = self.perturbation if self.perturbation and self.perturbation.block == block.name else None
        weights = block.weight_names()
        for rel, _ in list(block.module.named_parameters()):
            name = f"{block.prefix}.{rel}"
            tensor = self._load(name)
            if name in self.masks:
                tensor.mul_(unpack_mask(self.masks[name], tensor.shape))
            if perturb is not None and name in weights:
                z = perturb.noise(weights.index(name), tuple(tensor.shape))
                tensor.add_(z.to(tensor.dtype), alpha=perturb.sign * perturb.epsilon)
            _set_tensor(self.model, name, tensor)

    def release(self, block: Block) -> None:
        """Put ``block``'s parameters back on the meta device and hand the memory back to the OS."""
        for rel, param in list(block.module.named_parameters()):
            _set_tensor(self.model, f"{block.prefix}.{rel}", torch.empty_like(param, device="meta"))
        return_freed_memory()

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Keep ``masks`` (weight name -> bool keep-mask) packed; later materialisations apply them."""
        for name, mask in masks.items():
            self.masks[name] = pack_mask(mask)

    @contextlib.contextmanager
    def streaming(self, skip: tuple[Block, ...] = ()) -> Iterator[None]:
        """Hooks that materialise each block right before it runs and release it right after."""
        handles = []
        skipped = {id(b) for b in skip}
        for block in self.blocks:
            if id(block) in skipped:
                continue
            handles.append(block.module.register_forward_pre_hook(lambda m, a, b=block: self.materialise(b)))
            handles.append(block.module.register_forward_hook(lambda m, a, o, b=block: self.release(b)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, inputs: dict, skip: tuple[Block, ...] = (), grad: bool = False):
        """The model's own forward on one calibration batch, streaming the blocks (``grad``: keep the graph)."""
        with torch.set_grad_enabled(grad), self.streaming(skip):
            try:
                return self.model(**inputs, use_cache=False)
            finally:  # an exception mid-forward (or a hook stopping it) may leave a block resident
                skipped = {id(b) for b in skip}
                for block in self.blocks:
                    if id(block) not in skipped and _resident(block):
                        self.release(block)


def return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the OS (``malloc_trim``; a no-op elsewhere).

    Without it, freed block weights stay in the allocator's arenas and the
    resident size creeps up block after block.
    """
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols include libc's
    except (OSError, AttributeError):
        pass


def _resident(block: Block) -> bool:
    return any(p.device.type != "meta" for p in block.module.parameters())


# ----------------------------------------------------------------------------- capture


class StopForward(Exception):
    """Raised by a hook to end a forward early once the inputs of interest are captured."""


@dataclass
class BlockCall:
    """Everything a block was called with besides its hidden states."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool = False
    added: torch.Tensor | None = None  # what the model added to the hidden states since the previous block


def with_added(hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """A block's output as the next block receives it: plus what the model adds in between (Qwen3-VL adds
    DeepStack features to the image tokens after its first language layers), if anything."""
    return hidden if call.added is None else hidden + call.added


@dataclass
class TowerInputs:
    """One calibration batch's input to a tower: first hidden states + each block's other arguments."""

    hidden: torch.Tensor
    calls: list[BlockCall]


def capture_tower(streamed: StreamedModel, tower: list[Block], inputs: dict) -> TowerInputs:
    """Run the model until the end of ``tower`` with its blocks replaced by recording stubs.

    Earlier towers run for real (streamed, pruned where already pruned); the
    stubs pass hidden states through unchanged, so recording every block's
    arguments costs nothing, and the forward stops after the tower's last block.
    A block whose input is not what the previous stub returned gets the difference
    (``BlockCall.added``): the model added it between the two blocks.
    """
    calls: list[BlockCall] = []
    first: list[torch.Tensor] = []
    returned: list[torch.Tensor] = []

    def make_stub(block: Block):
        def stub(*args, **kwargs):
            if args:
                hidden, rest, as_kw = args[0], args[1:], False
            else:
                kwargs = dict(kwargs)
                hidden, rest, as_kw = kwargs.pop("hidden_states"), (), True
            if not calls:
                first.append(hidden)
            added = hidden - returned[-1] if returned and hidden is not returned[-1] else None
            calls.append(BlockCall(rest, kwargs, as_kw, added))
            returned[:] = [hidden]
            return hidden

        return stub

    def stop(*_):
        raise StopForward

    for block in tower:
        block.module.forward = make_stub(block)
    handle = tower[-1].module.register_forward_hook(stop)
    try:
        streamed.forward(inputs, skip=tuple(tower))
    except StopForward:
        pass
    finally:
        handle.remove()
        for block in tower:
            del block.module.forward
    if len(calls) != len(tower) or not first:
        raise ModelLoadError(f"the forward called {len(calls)} of the {len(tower)} blocks of the {tower[0].tower} "
                             "tower once each", "this model's layout is not supported for pruning")
    return TowerInputs(first[0], calls)


def run_block(block: Block, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Call a (materialised) block as the model did, with new hidden states."""
    if call.hidden_as_kwarg:
        out = block.module(*call.args, hidden_states=hidden, **call.kwargs)
    else:
        out = block.module(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def layer_stats(linears: dict[str, nn.Linear], new_stats: Callable[[nn.Linear], object]) -> Iterator[dict]:
    """Hooks feeding each Linear's input to its own collector ``new_stats(linear)`` (a method's ``.add(x)``)."""
    stats = {name: new_stats(linear) for name, linear in linears.items()}
    handles = [linear.register_forward_pre_hook(lambda module, args, s=stats[name]: s.add(args[0]))
               for name, linear in linears.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- the loop


def towers_of(blocks: list[Block]) -> list[list[Block]]:
    """Blocks grouped into consecutive towers, in execution order: runs of one tower's blocks that sit in
    one module list, so that each block's output is the next one's input (Mllama's local and global
    vision encoders, with a norm and embeddings in between, are two)."""
    towers: list[list[Block]] = []
    for block in blocks:
        same_list = towers and towers[-1][-1].prefix.rpartition(".")[0] == block.prefix.rpartition(".")[0]
        if towers and towers[-1][0].tower == block.tower and same_list:
            towers[-1].append(block)
        else:
            towers.append([block])
    return towers


def sequential_prune(streamed: StreamedModel, batches: list[dict],
                     prune_block: Callable[[Block, dict], dict], new_stats: Callable[[nn.Linear], object] = sq_norm_stats,
                     progress: Progress = lambda _: None, phases: Phases | None = None) -> None:
    """Calibrate, prune and re-run every block in order (vision tower, projector, LM).

    Each Linear's input feeds a collector ``new_stats(linear)``; ``prune_block(block,
    stats)`` returns a ``LayerUpdate`` per weight name from the live (dense) weights; the
    masks are applied before the block is re-run and kept (packed) in ``streamed.masks``.
    ``phases`` receives the time split (capture, read weights, statistics, method, next inputs).
    """
    phase = phases if phases is not None else Phases()
    total = len(streamed.blocks)
    done = 0
    with torch.no_grad():
        for tower in towers_of(streamed.blocks):
            progress(f"Capturing the inputs of the {tower[0].tower} {'tower' if len(tower) > 1 else 'block'}")
            with phase("capture tower inputs"):
                captured = [capture_tower(streamed, tower, batch) for batch in batches]
            hidden = [c.hidden for c in captured]
            for j, block in enumerate(tower):
                done += 1
                progress(f"({done}/{total}) Calibrating {block.name}")
                with phase("read weights"):
                    streamed.materialise(block)
                try:
                    with phase("statistics (block forward)"), layer_stats(block.linears, new_stats) as stats:
                        for h, c in zip(hidden, captured):
                            run_block(block, h, c.calls[j])
                    missing = [n for n, s in stats.items() if not s.tokens]
                    if missing:
                        raise ModelLoadError(f"{missing[0]} did not run during calibration",
                                             "this model's layout is not supported for pruning")
                    with phase("masks and updates (method)"):
                        updates = prune_block(block, {f"{n}.weight": s for n, s in stats.items()})
                        masks = {name: u.mask for name, u in updates.items()}
                        weights = {name: u.weight for name, u in updates.items() if u.weight is not None}
                        streamed.set_weights(block, weights)  # SparseGPT: the corrected kept weights
                        for name, mask in masks.items():
                            if name in weights:
                                _set_tensor(streamed.model, name, streamed._load(name))
                            streamed.model.get_parameter(name).mul_(mask)
                        streamed.set_masks(masks)
                    if j + 1 < len(tower):
                        with phase("next inputs (pruned block forward)"):
                            hidden = [with_added(run_block(block, h, c.calls[j]), c.calls[j + 1])
                                      for h, c in zip(hidden, captured)]
                finally:
                    streamed.release(block)
