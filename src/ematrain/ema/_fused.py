"""The fused update engine of `ModelEma` (private to `ematrain.ema`): which tensors a shadow
averages, packed how, and the plan of one fused update.

Design notes (why it looks the way it does):

* The tensor lists the update works on are built once and reused. Each update checks in O(1)
  that they still are the model's: torch's global registration hooks count every parameter,
  buffer or submodule registered (new Parameter objects loaded with ``assign=True``, a
  submodule replaced), one buffer slot is watched (``Module.to()`` replaces buffer objects
  without registering them), and the storage of the large tensors and the first one (a moved
  or converted model). Small tensors are read from the live tensor objects, which follow a
  ``.data`` change.
* Floating-point parameters *and* floating-point buffers (BatchNorm running statistics) are
  averaged; integer buffers (``num_batches_tracked``) are copied.
* The small floating-point tensors of each shadow (biases, norm weights, BatchNorm statistics:
  most of a CNN's tensors but little of its memory) are views into one flat buffer, and so are
  its integer buffers. An update gathers the model's small tensors with one ``torch.cat`` and
  checks and averages them with one op each, instead of paying a few hundred per-tensor op costs
  (which add up on a CPU).
* Several decays are updated by one ``torch._foreach_lerp_`` call over a list in which every
  slice of the model is followed by the matching slices of each shadow. Slices are small enough
  to stay in cache, so the model is read from memory about once rather than once per decay.
  Slicing happens only where the model and the shadows lay out their elements alike.
* The shadow may live on another device or in another dtype (a float32 shadow of a bfloat16
  model). The model is then first copied into staging buffers (pinned host memory for a CUDA
  model and a CPU shadow) with batched non-blocking copies, and the update runs where the
  shadow lives.
* The update never waits for the device: it makes no host synchronization on CUDA. A shadow in
  host memory of a CUDA model (``device="cpu"``) is fed by a copy into pinned buffers on a side
  stream, and averaged by a worker thread while the next steps run (`HostAverager`); whatever
  reads the shadows (`state_dict`, validation, `nonfinite_shadows`) waits for it first.
* NaN and Inf: by default an update averages what it is given, and `nonfinite_shadows` checks the
  shadows where they leave memory (a training loop calls it before it validates or saves them;
  ematrain's stops the run there). ``skip_nonfinite=True`` checks the model before every update
  instead and skips (and counts) an update whose weights hold NaN or Inf, so a shadow is never
  touched by one. That check must finish before any shadow is written: one extra read of the
  model, 4 bytes per float32 weight on top of the update's 12 (read model, read and write
  shadow), and on CUDA one host synchronization per update.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..util.modules import unwrap_model

# Slices of this many elements (1 MiB of float32) keep one model slice and its shadows in L2.
_CHUNK_ELEMS = 1 << 18
# Shadow tensors of at most this many elements are packed into one flat buffer per shadow.
_SMALL_ELEMS = 1 << 16


def float_and_int_tensors(module: nn.Module, average_buffers: bool = True
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters and buffers in a stable order, each storage once (tied weights count once):
    those averaged (floating point) and those copied (integer ones; every buffer when
    `average_buffers` is False)."""
    floats, ints, seen = [], [], set()
    params = list(module.parameters())
    for i, tensor in enumerate(params + list(module.buffers())):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        averaged = tensor.is_floating_point() and (average_buffers or i < len(params))
        (floats if averaged else ints).append(tensor)
    return floats, ints


# Parameters, buffers and submodules registered anywhere in the process, counted by torch's global
# registration hooks: an update tells in O(1) whether its plan may hold replaced tensor objects.
_REGISTRATIONS = [0]


def _count_registration(module, name, value):
    # Called before the slot is set. Setting a slot to the object it holds (``self.buf += 1``
    # on a buffer attribute, as torch's AveragedModel does every update) changes nothing.
    slots = (module._parameters, module._buffers, module._modules)
    if not any(slot.get(name) is value for slot in slots):
        _REGISTRATIONS[0] += 1


_HOOKS: list = []  # the handles, once installed


def install_registration_hooks() -> None:
    """Install the three counting hooks, once per process: at the first `ModelEma`, not at import,
    so that importing ematrain leaves torch's global hooks as they were. Plans are built after
    this, so each compares counts that every registration since has moved."""
    if not _HOOKS:
        _HOOKS.extend(register(_count_registration) for register in (
            nn.modules.module.register_module_parameter_registration_hook,
            nn.modules.module.register_module_buffer_registration_hook,
            nn.modules.module.register_module_module_registration_hook))


def _first_buffer_slot(module: nn.Module):
    """(owner, name, tensor) of the first buffer: `Module.to()` replaces buffer objects without
    a registration, all at once, so watching one tells."""
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                return mod, name, buf
    return None


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of `flat` shaped like the tensors of `like`."""
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


def _pack(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Move ``tensors`` (in place, keeping their values) into views of one new flat buffer."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    offset = 0
    for t in tensors:
        view = flat[offset:offset + t.numel()]
        view.copy_(t.reshape(-1))
        t.data = view.view(t.shape)
        offset += t.numel()
    return flat


def placement(source: nn.Module, device, dtype) -> tuple[torch.device, torch.dtype]:
    """Where shadows of `source` live and in which dtype: with the model by default, and in
    float32 for a 16-bit model (a ``(1 - decay)`` step rounds away in 16 bits)."""
    floats, _ = float_and_int_tensors(source)
    model_dtype = floats[0].dtype if floats else torch.float32
    if dtype is None:
        dtype = torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype
    if device is None:
        device = floats[0].device if floats else torch.device("cpu")
    return torch.device(device), dtype


def shadow_copy(source: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """An eval-mode, gradient-free copy of `source` on `device`, floats in `dtype`."""
    module = copy.deepcopy(source)
    module.to(device=device)
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
        if isinstance(tensor, nn.Parameter):
            tensor.grad = None  # deepcopy copies .grad; a shadow never needs one
    module.eval()
    module.requires_grad_(False)
    return module


class Shadows:
    """The shadow modules' tensors, each shadow's small ones packed into one flat buffer.

    Small contiguous float tensors of a shadow become views into one flat buffer, so that they
    are averaged by one op (see the module notes); so do its integer buffers. `adopt` runs again
    when a shadow module was moved or converted from outside (`moved`).
    """

    def __init__(self, modules: list[nn.Module], average_buffers: bool = True):
        self.modules, self.average_buffers = modules, average_buffers
        self.adopt()

    @torch.no_grad()
    def adopt(self) -> None:
        self.floats, self.ints = zip(*(float_and_int_tensors(m, self.average_buffers)
                                       for m in self.modules))
        first = self.floats[0]
        if first:
            self.device, self.dtype = first[0].device, first[0].dtype
        self.small = [i for i, t in enumerate(first)
                      if t.numel() <= _SMALL_ELEMS and t.is_contiguous()
                      and t.dtype == self.dtype and t.device == self.device]
        self.small_flats = []
        if self.small:
            for floats in self.floats:
                self.small_flats.append(_pack([floats[i] for i in self.small], self.dtype,
                                              self.device))
        # Integer buffers (num_batches_tracked) likewise, when they share one dtype.
        ints0 = self.ints[0]
        self.int_flats = []
        if ints0 and all(t.is_contiguous() and t.dtype == ints0[0].dtype
                         and t.device == ints0[0].device for t in ints0):
            for ints in self.ints:
                self.int_flats.append(_pack(ints, ints0[0].dtype, ints0[0].device))
        self._marks = self._storage_marks()
        self._plan = None

    def _storage_marks(self) -> list[tuple[int, ...]]:
        """Storage of each shadow's first and last float tensor: changes when it is moved."""
        return [tuple(t.data_ptr() for t in floats[:1] + floats[-1:]) for floats in self.floats]

    def moved(self) -> bool:
        return self._storage_marks() != self._marks

    def plan_for(self, model: nn.Module) -> "Plan":
        """The update plan, rebuilt when the model's tensors moved or were replaced."""
        source = unwrap_model(model)
        if self._plan is None or not self._plan.valid_for(source):
            floats, ints = float_and_int_tensors(source, self.average_buffers)
            if len(floats) != len(self.floats[0]) or len(ints) != len(self.ints[0]):
                raise ValueError("model does not match the EMA's structure")
            for m, s in zip(floats, self.floats[0]):
                if m.shape != s.shape:
                    raise ValueError(f"model tensor of shape {tuple(m.shape)} does not match EMA "
                                     f"tensor of shape {tuple(s.shape)}")
            self._plan = Plan.build(source, floats, ints, self)
        return self._plan


class Plan:
    """Tensor lists of one update, valid while the model's storage does not change."""

    def __init__(self, floats: list[torch.Tensor], ints: list[torch.Tensor]):
        self.floats = floats
        self.ints = ints
        # Staging (model on another device or in another dtype than the shadows).
        self.copy_dst: list[torch.Tensor] | None = None
        self.copy_src: list[torch.Tensor] | None = None
        self.sync: torch.device | None = None
        # Gathering the model's small tensors into one flat buffer (same device and dtype): the
        # live tensors are copied into views of it, so a `.data` change is followed.
        self.gather_src: list[torch.Tensor] = []
        self.gather_dst: list[torch.Tensor] = []
        # Integer buffers copied straight into views of the shadows' flat integer buffer;
        # staged (on the shadows' device) when the model is elsewhere.
        self.int_gather: list[torch.Tensor] | None = None
        self.int_dst: list[torch.Tensor] = []
        # What `valid_for` compares.
        self.source_id = 0
        self.registrations = -1
        self.watched: list[tuple[torch.Tensor, int]] = []
        self.buffer_slot = None
        # What the finiteness check reads, and the lerp operands.
        self.check: list[torch.Tensor] = []
        self.lerp_self: list[torch.Tensor] = []
        self.lerp_end: list[torch.Tensor] = []

    def valid_for(self, source: nn.Module) -> bool:
        """Whether this plan still reads `source`'s tensors: no tensor object replaced (counted
        registrations, the watched buffer slot) and no storage moved (the watched pointers)."""
        if id(source) != self.source_id or _REGISTRATIONS[0] != self.registrations:
            return False
        if self.buffer_slot is not None:
            owner, name, tensor = self.buffer_slot
            if owner._buffers.get(name) is not tensor:
                return False
        return all(t.data_ptr() == ptr for t, ptr in self.watched)

    @classmethod
    def build(cls, source: nn.Module, floats: list[torch.Tensor], ints: list[torch.Tensor],
              shadows: Shadows) -> "Plan":
        plan = cls(floats, ints)
        plan.source_id, plan.registrations = id(source), _REGISTRATIONS[0]
        plan.buffer_slot = _first_buffer_slot(source)
        flats = shadows.int_flats
        if flats and all(t.dtype == flats[0].dtype and t.device == flats[0].device for t in ints):
            plan.int_gather = _views(flats[0], ints)
        small = shadows.small
        small_set = set(small)
        others = [i for i in range(len(floats)) if i not in small_set]
        staged = any(m.device != s.device or m.dtype != s.dtype
                     for m, s in zip(floats, shadows.floats[0]))
        if staged:
            small_src, other_src = plan._stage(small, others, shadows)
        else:
            small_src, other_src = plan._gather_small(small, others, shadows)
        # Views of the large tensors (the several-decay slices) keep their old storage: watch
        # where each lives, and the first tensor (a moved or converted model).
        plan.watched = [(t, t.data_ptr()) for t in floats[:1] + [floats[i] for i in others]]
        ends = ([small_src] if small else []) + other_src
        selfs = [([shadows.small_flats[k]] if small else []) + [shadow[i] for i in others]
                 for k, shadow in enumerate(shadows.floats)]
        # The average runs over the tensors in the reverse order of the finiteness check, so
        # that it starts with the model tensors the check read last, still in the CPU's cache.
        ends.reverse()
        for s in selfs:
            s.reverse()
        plan._interleave(ends, selfs)
        return plan

    def _stage(self, small: list[int], others: list[int], shadows: Shadows):
        """One flat staging buffer where the shadows live: small tensors first, in the order
        of the shadows' flat buffers, then the rest."""
        floats = self.floats
        pin = (shadows.device.type == "cpu" and torch.cuda.is_available()
               and any(t.device.type == "cuda" for t in floats))
        flat = torch.empty(sum(t.numel() for t in floats), dtype=shadows.dtype,
                           device=shadows.device, pin_memory=pin)
        views: list[torch.Tensor] = [flat] * len(floats)
        offset = 0
        for i in small + others:
            views[i] = flat[offset:offset + floats[i].numel()].view(floats[i].shape)
            offset += floats[i].numel()
        self.copy_dst, self.copy_src = views, list(floats)
        cuda = [t.device for t in floats if t.device.type == "cuda"]
        self.sync = cuda[0] if cuda else None
        if self.ints and self.int_gather is None and self.ints[0].device != shadows.device:
            self.int_dst = [torch.empty(t.shape, dtype=t.dtype, device=shadows.device,
                                        pin_memory=pin) for t in self.ints]
        self.check = [flat]
        return flat[:sum(floats[i].numel() for i in small)], [views[i] for i in others]

    def _gather_small(self, small: list[int], others: list[int], shadows: Shadows):
        """The model's small tensors gathered into one buffer (one op to check and average)."""
        floats = self.floats
        small_src = None
        if small:
            small_src = torch.empty(sum(floats[i].numel() for i in small), dtype=shadows.dtype,
                                    device=shadows.device)
            self.gather_src = [floats[i] for i in small]
            self.gather_dst = _views(small_src, self.gather_src)
        other_src = [floats[i] for i in others]
        self.check = ([small_src] if small else []) + other_src
        return small_src, other_src

    def read_model(self) -> None:
        """Bring the model's values where the update reads them: the staging buffer (another
        device or dtype) or the gathered small tensors."""
        if self.copy_dst is not None:
            torch._foreach_copy_(self.copy_dst, self.copy_src, non_blocking=True)
            if self.int_dst:
                torch._foreach_copy_(self.int_dst, self.ints, non_blocking=True)
        elif self.gather_src:
            torch._foreach_copy_(self.gather_dst, self.gather_src)

    def average(self, weights: list[float]) -> None:
        """``shadow += weight * (model - shadow)`` for every shadow, one fused call."""
        if not self.lerp_self:
            return
        if len(weights) == 1:
            torch._foreach_lerp_(self.lerp_self, self.lerp_end, weights[0])
        else:
            torch._foreach_lerp_(self.lerp_self, self.lerp_end,
                                 weights * (len(self.lerp_self) // len(weights)))

    def copy_ints(self, shadows: Shadows) -> None:
        """Integer buffers (num_batches_tracked) are copied, not averaged."""
        if self.int_gather is not None:
            torch._foreach_copy_(self.int_gather, self.ints)
            for flat in shadows.int_flats[1:]:
                flat.copy_(shadows.int_flats[0])
        elif self.ints:
            source = self.int_dst or self.ints
            for shadow_ints in shadows.ints:
                torch._foreach_copy_(shadow_ints, source, non_blocking=True)

    def _interleave(self, ends: list[torch.Tensor], selfs: list[list[torch.Tensor]]) -> None:
        """The lerp lists; with several decays every model slice is followed by the same slice
        of each shadow, so the model is read about once."""
        if len(selfs) == 1:
            self.lerp_self, self.lerp_end = selfs[0], ends
            return
        for p, src in enumerate(ends):
            targets = [s[p] for s in selfs]
            if (src.numel() > _CHUNK_ELEMS and src.is_contiguous()
                    and all(t.is_contiguous() for t in targets)):
                # Slice only where model and shadows lay their elements out alike.
                src_parts = src.detach().view(-1).split(_CHUNK_ELEMS)
                target_parts = [t.view(-1).split(_CHUNK_ELEMS) for t in targets]
                for j, part in enumerate(src_parts):
                    for parts in target_parts:
                        self.lerp_self.append(parts[j])
                        self.lerp_end.append(part)
            else:
                for t in targets:
                    self.lerp_self.append(t)
                    self.lerp_end.append(src)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf: one reduction per tensor, one host sync in all.

    A sum (a 2-norm on CUDA, where a fused multi-tensor kernel exists) is the cheapest full read
    that propagates NaN and Inf. 16-bit tensors are reduced in float32 so that a large but finite
    sum does not overflow; a float32 overflow to Inf counts as bad, which is the safe side.
    """
    if not tensors:
        return True
    half = tensors[0].dtype in (torch.float16, torch.bfloat16)
    if tensors[0].device.type == "cuda":
        partial = torch._foreach_norm(tensors, 2, dtype=torch.float32 if half else None)
    elif half:
        partial = [t.sum(dtype=torch.float32) for t in tensors]
    else:
        partial = [t.sum() for t in tensors]
    return bool(torch.isfinite(torch.stack(partial)).all())
