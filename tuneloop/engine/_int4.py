"""Our int4 kernels (``int4_kernel.c``), C decoding step (``decode_step.c``) and the output projection's
rescoring (``top_rescore.c``): compiled on first use, loaded with ctypes.

Two kernels: float32 activations as they are (``int4_mm``, every build), and,
in the AVX2 build, activations rounded per group of 32 to 15- or 8-bit
integers (``int4_mm_q``, integer dot products; ``activations`` says which a
build uses, ``pack`` and ``pack_q`` lay the weights out for each).

Compiled with the system's C compiler (no torch headers: building against
them takes minutes) into ``$TUNELOOP_CACHE/kernels/`` (else
``~/.cache/tuneloop/kernels/``) under a name hashed from the source and the
flags, written under a temporary name and renamed, so processes that compile
at once never load half a file. ctypes releases the GIL during the call.

``TUNELOOP_INT4_KERNEL=torch`` keeps torch's bfloat16 kernel (for comparing
the two), ``=avx2`` builds the AVX2 form on a CPU with AVX-512 (for testing
and comparing it); without a compiler, AVX2 or a successful compile torch's
serves, with one log line saying why (``unavailable``).

Public surface: ``library``, ``unavailable``, ``build``, ``activations``, ``matmul``, ``pack``, ``pack_q``,
``unpack``, ``top_rescore``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int4_kernel.c")
#: Compiled into the same library: a whole decoding step on these weights (``_native``) and the rescoring of
#: the output projection's candidates (``top_rescore``).
SOURCES = (SOURCE, SOURCE.with_name("decode_step.c"), SOURCE.with_name("top_rescore.c"))
#: Explicit instruction sets rather than -march=native, so a cached build does not depend on the machine
#: that compiled it beyond these (checked against /proc/cpuinfo before loading): AVX-512 where the CPU
#: has it, else AVX2 (most CPUs since 2013, AMD's before Zen 4 among them), the same source either way.
COMMON = ("-O3", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
BUILDS = {
    "avx512": (("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", *COMMON),
               ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c")),
    "avx2": (("-mavx2", *COMMON), ("avx2", "fma", "f16c")),
}
LANES = 16
GROUP = 32
#: Outputs a block and inputs a chunk of the integer kernel's layout (``pack_q``).
QB = 8
#: The most candidates ``top_rescore`` keeps a row (``MAXK`` in top_rescore.c).
MAX_K = 256
#: The activations each build multiplies by by default (``activations``).
ACTIVATIONS = {"avx512": "float", "avx2": "int16"}


def cache_dir() -> Path:
    """``$TUNELOOP_CACHE/kernels``, else ``~/.cache/tuneloop/kernels``."""
    env = os.environ.get("TUNELOOP_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "tuneloop") / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "").split()
    for name in ([cc[0]] if cc else []) + ["cc", "gcc"]:
        path = shutil.which(name)
        if path:
            return path
    return None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The library for this CPU (or the one ``TUNELOOP_INT4_KERNEL`` names), or None and why not."""
    asked = os.environ.get("TUNELOOP_INT4_KERNEL", "").lower()
    if asked == "torch":
        return None, "TUNELOOP_INT4_KERNEL=torch"
    flags = _cpu_flags()
    isa = asked if asked in BUILDS else next(
        (name for name, (_, needs) in BUILDS.items() if all(f in flags for f in needs)), "avx2")
    return build(isa)


@functools.cache
def build(isa: str) -> tuple[ctypes.CDLL | None, str]:
    """The kernel compiled for ``isa`` (a key of ``BUILDS``) and loaded, or None and why not."""
    options, needs = BUILDS[isa]
    missing = [f for f in needs if f not in _cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc) found"
    try:
        source = b"\0".join(path.read_bytes() for path in SOURCES)
    except OSError as exc:  # an installed package without its package data
        return None, f"no kernel source: {exc}"
    key = hashlib.sha256(source + "\0".join((cc, *options)).encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"int4_kernel-{isa}-{key}.so"
    if not target.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            try:
                done = subprocess.run([cc, *options, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                                      timeout=120)
                if done.returncode:
                    lines = (done.stderr or done.stdout).strip().splitlines()
                    return None, f"{Path(cc).name} failed: {lines[0] if lines else done.returncode}"
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"compiling {SOURCE.name}: {exc}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"loading {target.name}: {exc}"
    args = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
    lib.int4_mm.restype = None
    lib.int4_mm.argtypes = args
    if hasattr(lib, "int4_mm_q"):  # the AVX2 build's integer-activation kernel
        lib.int4_mm_q.restype = None
        lib.int4_mm_q.argtypes = [*args, ctypes.c_int]
    if hasattr(lib, "decode_step"):
        lib.decode_step.restype = ctypes.c_int
        lib.decode_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                    ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.top_rescore.restype = None
    lib.top_rescore.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
    lib.isa = isa
    return lib, ""


def activations(lib: ctypes.CDLL) -> str:
    """How ``lib`` multiplies by activations: ``float`` (exact float32) or rounded to ``int16`` / ``int8``.

    ``TUNELOOP_INT4_ACTIVATIONS`` chooses where the build has the integer
    kernel (AVX2); the default is ``ACTIVATIONS[lib.isa]``.
    """
    if not hasattr(lib, "int4_mm_q"):
        return "float"
    asked = os.environ.get("TUNELOOP_INT4_ACTIVATIONS", "").lower()
    return asked if asked in ("float", "int16", "int8") else ACTIVATIONS.get(lib.isa, "float")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (logged once, with the reason) where torch's serves instead."""
    lib, why = _load()
    if lib is None:
        log.info("int4 weights: torch's bfloat16 kernel (%s)", why)
    else:
        log.info("int4 weights: our kernel (%s, %s, %s activations)", SOURCE.name, lib.isa, activations(lib))
    return lib


def unavailable() -> str:
    """Why our kernel is not used; '' when it is."""
    return _load()[1]


def pack(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, half: bool
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout of codes ``[out, in]`` (0-15) and scales/minimums ``[out, in / 32]``.

    Codes: ``[blocks][in / 2][16]`` bytes, output rows padded with zeros to a
    multiple of 16; scales and minimums ``[blocks][in / 32][2][16]`` in
    float16 when ``half`` (exact there) else float32.
    """
    out, width = codes.shape
    blocks = -(-out // LANES)
    pad = blocks * LANES - out
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad))  # [blocks * 16, in]
    pairs = c[:, 0::2] | (c[:, 1::2] << 4)  # [rows, in / 2]
    packed = pairs.view(blocks, LANES, width // 2).transpose(1, 2).contiguous()
    sm = torch.stack([scale, minimum], -1)  # [out, groups, 2]
    sm = torch.nn.functional.pad(sm, (0, 0, 0, 0, 0, pad))
    sm = sm.view(blocks, LANES, width // GROUP, 2).permute(0, 2, 3, 1).contiguous()
    return packed, sm.to(torch.float16 if half else torch.float32)


def pack_q(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, half: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer kernel's layout (``int4_mm_q`` in ``int4_kernel.c``) of what ``pack`` takes.

    Codes: ``[blocks][in / 8][8][4]`` bytes, blocks of 8 outputs (padded with
    zeros), byte ``[b][c][j][t]`` holding code ``[8b+j][8c+t]`` in its low and
    ``[8b+j][8c+4+t]`` in its high nibble; scales and minimums
    ``[blocks][in / 32][2][8]``.
    """
    out, width = codes.shape
    blocks = -(-out // QB)
    pad = blocks * QB - out
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad)).view(blocks, QB, width // 8, 2, 4)
    packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).transpose(1, 2).contiguous()  # [blocks, in / 8, 8, 4]
    sm = torch.nn.functional.pad(torch.stack([scale, minimum], -1), (0, 0, 0, 0, 0, pad))
    sm = sm.view(blocks, QB, width // GROUP, 2).permute(0, 2, 3, 1).contiguous()
    return packed, sm.to(torch.float16 if half else torch.float32)


def unpack(codes: torch.Tensor, sm: torch.Tensor, out: int, width: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]`` (int32), scales and minimums ``[out, in / 32]`` (float32) of ``pack`` or ``pack_q``."""
    if codes.dim() == 4:  # pack_q's
        nib = torch.stack([codes & 0x0F, codes >> 4], 3)  # [blocks, in / 8, 8, 2, 4]
        c = nib.permute(0, 2, 1, 3, 4).reshape(-1, width)[:out]
    else:
        pairs = codes.transpose(1, 2).reshape(-1, width // 2)[:out]
        c = torch.stack([pairs & 0x0F, pairs >> 4], -1).view(out, width)
    s = sm.float().permute(0, 3, 1, 2).reshape(-1, width // GROUP, 2)[:out]  # the same [blocks][groups][2][lanes]
    return c.to(torch.int32), s[..., 0], s[..., 1]


def matmul(lib: ctypes.CDLL, x: torch.Tensor, codes: torch.Tensor, sm: torch.Tensor, out: int,
           threads: int | None = None, activations: str = "float") -> torch.Tensor:
    """``x @ W^T`` in float32 for float32 ``x`` ``[M, in]`` and ``pack``'s ``codes``, ``sm`` (``pack_q``'s
    with ``activations`` ``int16`` or ``int8``, the inputs rounded so)."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    args = (x.data_ptr(), x.shape[0], x.shape[1], codes.data_ptr(), sm.data_ptr(), int(sm.dtype == torch.float16),
            out, y.data_ptr(), torch.get_num_threads() if threads is None else threads)
    if activations == "float":
        lib.int4_mm(*args)
    else:
        lib.int4_mm_q(*args, int(activations == "int16"))
    return y


def top_rescore(lib: ctypes.CDLL, logits: torch.Tensor, k: int, weight: torch.Tensor, x: torch.Tensor
                ) -> torch.Tensor:
    """``logits`` ``[M, V]`` with each row's ``k`` largest replaced, in place, by ``x @ weight[top].T`` in
    float32 (``weight`` ``[V, C]`` and ``x`` ``[M, C]`` float32, contiguous); returns ``top`` ``[M, k]``."""
    m, v = logits.shape
    k = min(k, v, MAX_K)
    top = torch.empty(m, k, dtype=torch.int64)
    lib.top_rescore(logits.data_ptr(), m, v, k, weight.data_ptr(), x.data_ptr(), x.shape[1], top.data_ptr(),
                    torch.get_num_threads())
    return top
