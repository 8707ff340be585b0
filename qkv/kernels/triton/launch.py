"""Launching a Triton kernel again without Triton's per-launch binding: for the kernels a decoding
step launches once per layer and generated token.

``kernel[grid](...)`` through Triton's ``JITFunction.run`` binds every argument, specializes it
(a tensor's dtype and 16-byte alignment, an integer's value class), builds a string cache key of
all of them and the constexprs, checks the kernel's globals, and only then launches: on an H200's
host ~34 us a launch where launching the compiled kernel itself takes ~12 us
(``benchmarks/launch_cost.py``). A decoding step is host-bound (docs/attention.md), so
:class:`Launcher` keeps each compiled kernel under a key of its own that tells apart at least
what Triton's specialization does (:meth:`Launcher.key`) and launches it directly when the key
comes again; a new key goes through ``JITFunction.run`` once (which compiles or finds the kernel,
and launches it) and keeps what it returns, or the OutOfResources it raised (a kernel too large
for the device, raised again at once for that key). Under Triton's interpreter (``TRITON_INTERPRET=1``:
nothing is compiled) every launch is the interpreter's.
"""

from __future__ import annotations

import operator

import torch
from triton.runtime.errors import OutOfResources

I32 = (-(1 << 31), 1 << 31)


class Launcher:
    """``Launcher(jit_fn)[grid](*args, **constexprs_and_options)`` launches like
    ``jit_fn[grid](...)`` (``grid``: a tuple of one to three sizes), with every runtime argument
    positional (tensors where the kernel takes pointers, Python ints for its integers) and every
    constexpr (the kernel's last parameters) and launch option (``num_warps``, ``num_stages``,
    ``maxnreg``) by keyword. ``jit`` is the Triton function itself."""

    def __init__(self, jit) -> None:
        self.jit = jit
        params = list(getattr(jit, "params", ()))
        self._params = [p for p in params if not p.is_constexpr]
        if any(p.is_constexpr for p in params[: len(self._params)]):
            raise TypeError(f"Launcher: {getattr(jit, '__name__', jit)} takes a constexpr before a runtime "
                            "argument; put its constexprs last")
        self._kinds = None  # per runtime argument: tensor, specialized int, unspecialized int
        self._compiled: dict = {}

    def __getitem__(self, grid: tuple[int, ...]):
        if not self._params:  # the interpreter's function: nothing is compiled
            return self.jit[grid]
        grid = (*grid, 1, 1)[:3]  # a compiled kernel takes all three sizes
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _pick(self, args: tuple) -> None:
        """The argument positions of each kind (tensors, specialized and unspecialized integers,
        anything else), from the first call's argument types; a later call whose types differ
        is launched through the JIT and not kept."""
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ints = [i for i, a in enumerate(args) if type(a) is int]
        others = [i for i in range(len(args)) if i not in tensors and i not in ints]
        self._kinds = tuple(
            (lambda _: ()) if not idx else operator.itemgetter(*idx) if len(idx) > 1 else (lambda a, i=idx[0]: (a[i],))
            for idx in (tensors,
                        [i for i in ints if not self._params[i].do_not_specialize],
                        [i for i in ints if self._params[i].do_not_specialize],
                        others)
        )
        self._types = tuple(map(type, args))

    def key(self, args: tuple, kwargs: dict) -> tuple:
        """The arguments' part of a launch's key (the launch adds the current device, as Triton
        keeps compiled kernels per device): each tensor's dtype and address modulo 16, the
        specialized integers' values (finer than Triton's classes: 1, multiple of 16, other, and
        their range), whether every unspecialized integer is 32-bit (Triton's only class of
        those; a key that is not is never kept), every other argument's type, and the keywords."""
        tensors, spec, unspec, others = (pick(args) for pick in self._kinds)
        return (tuple([(t.dtype, t.data_ptr() & 15) for t in tensors]), spec,
                not unspec or (I32[0] <= min(unspec) and max(unspec) < I32[1]), tuple(map(type, others)),
                tuple(kwargs.items()))

    def _launch(self, grid, args: tuple, kwargs: dict) -> None:
        if self._kinds is None:
            self._pick(args)
        try:
            key = (torch.cuda.current_device(), self.key(args, kwargs))
            hit = self._compiled.get(key)
        except (AttributeError, TypeError):  # types unlike the first call's, or an unhashable keyword
            self.jit[grid](*args, **kwargs)
            return
        if hit is not None:
            compiled, constexprs = hit
            if isinstance(compiled, OutOfResources):
                raise compiled
            compiled[grid](*args, *constexprs)
            return
        try:
            compiled = self.jit[grid](*args, **kwargs)
        except OutOfResources as e:  # the compiled kernel does not fit this device: raised before it ran
            self._compiled[key] = e, ()
            raise
        if compiled is not None and key[1][2] and tuple(map(type, args)) == self._types:
            self._compiled[key] = compiled, tuple(kwargs[p.name] for p in self.jit.params[len(args):])
