"""CacheGen on CUDA: batched encode and decode of many sections at once, same bytes and values as the CPU path.

Decode: the sections are parsed on the host (the CPU decoder's checks), copied to the device in one transfer, then
``rans_decode_smem`` (one block per stream type with its tables in shared memory, one warp per section, lane =
rANS lane, ballot + popc for word offsets; raw bits and escapes in the same pass; ``rans_decode`` reads the tables
from global memory when they do not fit), ``esc_fix`` (escaped levels from the exception list), one float64 batched
GEMM per stream type over all sections (exact: every sum is an integer below 2**53) and ``dec_epilogue``, which
writes straight into the caller's tensors (any strides, the layout dtype). Encode: key means and value norms in
numpy's summation order (so sink flags and key means match), ``enc_forward``, float64 GEMM, ``enc_symbols``,
``rans_encode`` (one warp per stream), ``raw_pack``, ``gather_words`` and ``esc_gather`` into one device buffer,
one copy to pinned host memory. Kernels: :mod:`codec._gpu_kernels` (CuPy RawModule, NVRTC). See docs/codec.md.
"""

from __future__ import annotations

import functools
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from codec import _rans
from codec._gpu_kernels import SOURCE
from codec.errors import CorruptStream, InvalidInput

__all__ = ["available", "GpuCacheGen", "DecodeBatch", "for_codec"]

_HEAD = struct.Struct("<BBHIII")
_THREADS = 256
_DECODE_WARPS = 32  # sections (warps) per block of rans_decode_smem
_SMEM_LIMIT = 160 * 1024  # shared memory of rans_decode_smem; stream types needing more use rans_decode
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_ERRORS = {1: "rANS initial state below the lower bound", 2: "rANS stream ended early (truncated or corrupt)",
           4: "exception list does not match the bitstream", 8: "integer level out of range",
           16: "rANS streams did not end cleanly (corrupt or foreign bitstream)"}
_lock = threading.Lock()


@functools.cache
def available() -> bool:
    """True when torch sees a CUDA device and CuPy is importable (checked once)."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels(device_index: int) -> dict:
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=SOURCE, options=("--std=c++17", "--fmad=false"))
        names = ("rans_decode", "rans_decode_smem", "esc_fix", "dec_epilogue", "enc_keymean", "enc_norms",
                 "enc_forward", "enc_symbols", "rans_encode", "esc_gather", "gather_words", "raw_pack")
        return {n: module.get_function(n) for n in names}


def _arg(a):
    if isinstance(a, torch.Tensor):
        return np.uint64(a.data_ptr())
    return a


def _blocks(n: int, per: int = _THREADS) -> int:
    return max(1, -(-n // per))


@dataclass
class _Layers:
    """Device tables of one layer range (stream s = (layer * 2 + kv) * C/G + group)."""

    num_streams: int
    tidmap: torch.Tensor  # int32 [S, G]
    wpre: torch.Tensor  # int32 [S, G + 1]: raw-bit offset of each coefficient within a token; [:, G] = bits/token
    bits_per_token: np.ndarray  # int64 [S]
    stepi: torch.Tensor  # float64 [S, G]
    scale: torch.Tensor  # float64 [S, G]: encoder's 2**-(S_in+13) * 2**S_step / step_int
    fwd: torch.Tensor  # float64 [S, G, G]: transform
    inv: torch.Tensor  # float64 [S, G, G]: transform^T
    mean: torch.Tensor  # float32 [nl * 2 * C]
    weight: torch.Tensor  # float32
    weight64: torch.Tensor  # float64
    sink_ratio: np.ndarray  # float64 [nl]
    uniq: torch.Tensor  # int32 [S, U]: the tables each stream type uses (padded)
    coef: torch.Tensor  # int32 [S, G]: local table | raw width << 8 | (lo + 32768) << 12
    smem: int  # bytes of shared memory for rans_decode_smem (0: too many tables, use rans_decode)


@dataclass
class DecodeBatch:
    """Sections parsed on the host and copied to the device (see :meth:`GpuCacheGen.prepare`)."""

    num_layers: int
    num_tokens: int
    layer_start: int
    nsec: int
    buf: torch.Tensor
    word_off: torch.Tensor
    word_cnt: torch.Tensor
    state_off: torch.Tensor
    raw_off: torch.Tensor
    exc_off: torch.Tensor
    n_exc: torch.Tensor
    km_off: torch.Tensor
    vb_off: torch.Tensor
    total_exc: int


class GpuCacheGen:
    """A CacheGen codec's tables on one CUDA device, with batched encode and decode."""

    def __init__(self, codec, device: torch.device) -> None:
        tabs = codec._require()
        self.codec, self.device, self.profile = codec, device, codec.profile
        self.kernels = _kernels(device.index)
        rt = tabs.rans
        if rt.alphabet > 256:
            raise InvalidInput("the GPU path supports tables of at most 256 symbols")
        t = np.arange(rt.freq.shape[0])[:, None]
        sym = rt.slot_sym.astype(np.int64)
        f = rt.freq.astype(np.int64)[t, sym]
        bias = np.arange(_rans.M)[None, :] - rt.cum.astype(np.int64)[t, sym]
        dec = (sym << 24) | ((f - 1) << 12) | bias
        enc = rt.freq.astype(np.int64) | (rt.cum.astype(np.int64) << 16)
        self.dec = self._dev(dec.astype(np.uint32).view(np.int32))
        self.sym_tab = self._dev(rt.slot_sym.astype(np.uint8))
        self.enc = self._dev(enc.astype(np.uint32).view(np.int32))
        self.alphabet = rt.alphabet
        self.lo = self._dev(tabs.lo.astype(np.int32))
        self.size = self._dev(tabs.size.astype(np.int32))
        self.raw_bits = tabs.raw_bits
        self.raw_bits_dev = self._dev(tabs.raw_bits.astype(np.int32))
        self.level = tabs.level
        self.inv_step = tabs.inv
        self._layer_cache: dict[tuple[int, int], _Layers] = {}

    def _dev(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _launch(self, name: str, grid, args, shared_mem: int = 0, block: int = _THREADS) -> None:
        import cupy

        stream = _stream(torch.cuda.current_stream(self.device).cuda_stream, self.device.index)
        with cupy.cuda.Device(self.device.index), stream:
            self.kernels[name](grid if isinstance(grid, tuple) else (grid,), (block,), tuple(_arg(a) for a in args),
                               shared_mem=shared_mem)

    def layers(self, layer_start: int, num_layers: int) -> _Layers:
        key = (layer_start, num_layers)
        if key not in self._layer_cache:
            p, sl = self.profile, slice(layer_start, layer_start + num_layers)
            g, c = p.stream_channels, p.channels
            s = num_layers * 2 * (c // g)
            tid = self.level.table_of[sl].astype(np.int64).reshape(s, g)
            wpre = np.zeros((s, g + 1), dtype=np.int64)
            wpre[:, 1:] = np.cumsum(self.raw_bits.astype(np.int64)[tid], axis=1)
            scale = 2.0 ** -(p.input_shift + 13) * self.inv_step[sl][:, :, None, :]
            fwd = p.transform[sl].astype(np.float64).reshape(s, g, g)
            used = [np.unique(row) for row in tid]
            u_max = max(len(u) for u in used)
            uniq = np.array([np.pad(u, (0, u_max - len(u)), mode="edge") for u in used], dtype=np.int32)
            local = np.stack([np.searchsorted(u, row) for u, row in zip(used, tid)])
            lo = self.level.lo.astype(np.int64)[tid] + 32768
            coef = local | (self.raw_bits.astype(np.int64)[tid] << 8) | (lo << 12)
            smem = 4 * ((u_max * 256 + 2 * g + 2) & ~1) + 8 * g + 4096 * u_max
            if smem > _SMEM_LIMIT or u_max > 255:
                smem = 0
            elif smem > 48 * 1024:
                kernel = self.kernels["rans_decode_smem"]
                kernel.max_dynamic_shared_size_bytes = max(kernel.max_dynamic_shared_size_bytes, smem)
            self._layer_cache[key] = _Layers(
                s, self._dev(tid.astype(np.int32)), self._dev(wpre.astype(np.int32)), wpre[:, g].copy(),
                self._dev(self.level.step_int[sl].astype(np.float64).reshape(s, g)), self._dev(scale.reshape(s, g)),
                self._dev(fwd), self._dev(np.swapaxes(fwd, 1, 2)), self._dev(p.mean[sl].astype(np.float32).ravel()),
                self._dev(p.weight[sl].astype(np.float32).ravel()), self._dev(p.weight[sl].astype(np.float64).ravel()),
                p.sink_ratio[sl].astype(np.float64), self._dev(uniq), self._dev(coef.astype(np.uint32).view(np.int32)),
                smem)
        return self._layer_cache[key]

    # -- decode ----------------------------------------------------------------------------------------------
    def prepare(self, sections, num_layers: int, num_tokens: int, layer_start: int, itemsize: int) -> DecodeBatch:
        """Parse ``sections`` (bytes-like) on the host and copy them to the device in one transfer."""
        lay = self.layers(layer_start, num_layers)
        p, s_n = self.profile, lay.num_streams
        runs = (num_tokens * lay.bits_per_token + 7) // 8
        run_pre = np.concatenate([[0], np.cumsum(runs)[:-1]])
        parsed, bases, total = [], [], 0
        for data in sections:
            view = memoryview(data).cast("B")
            parsed.append(_parse(view, num_layers, num_tokens, p.channels, s_n, itemsize, p.chunk_key_mean,
                                 num_tokens * p.stream_channels, int(runs.sum())))
            bases.append(total)
            total += -(-len(view) // 16) * 16
        host = torch.empty(max(total, 16), dtype=torch.uint8, pin_memory=True)
        hnp = host.numpy()
        for base, data in zip(bases, sections):
            view = memoryview(data).cast("B")
            hnp[base:base + len(view)] = np.frombuffer(view, np.uint8)
        nsec = len(sections)
        counts = np.stack([q["counts"] for q in parsed])  # [nsec, S]
        base = np.array(bases, dtype=np.int64)
        wpos = np.cumsum(counts, axis=1) - counts
        word_off = base[:, None] + np.array([q["words"] for q in parsed])[:, None] + 2 * wpos
        state_off = base[:, None] + np.array([q["states"] for q in parsed])[:, None] + 128 * np.arange(s_n)
        raw_off = base[:, None] + np.array([q["raw"] for q in parsed])[:, None] + run_pre[None, :]
        vb = np.full((nsec, num_layers), -1, dtype=np.int64)
        for k, q in enumerate(parsed):
            for layer, off in q["verbatim"].items():
                vb[k, layer] = base[k] + off
        km = np.array([base[k] + q["keymeans"] if q["keymeans"] >= 0 else -1 for k, q in enumerate(parsed)])
        n_exc = np.array([q["n_exc"] for q in parsed], dtype=np.int32)

        def dev(a, dtype):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype).ravel()).to(self.device, non_blocking=True)

        return DecodeBatch(num_layers, num_tokens, layer_start, nsec, host.to(self.device, non_blocking=True),
                           dev(word_off, np.int64), dev(counts, np.int32), dev(state_off, np.int64),
                           dev(raw_off, np.int64), dev(base + np.array([q["exceptions"] for q in parsed]), np.int64),
                           dev(n_exc, np.int32), dev(km.astype(np.int64), np.int64), dev(vb, np.int64),
                           int(n_exc.sum()))

    def run(self, batch: DecodeBatch, outs: list[torch.Tensor], check: bool = True) -> None:
        """Decode a prepared batch into ``outs`` (one ``[layers, 2, tokens, heads, dim]`` tensor per section, all
        with the same strides and dtype). Raises CorruptStream (after a device sync) when any section is bad."""
        dt = outs[0].dtype
        if dt not in _DTYPES or any(o.dtype != dt or o.stride() != outs[0].stride() or o.device != self.device
                                    for o in outs):
            raise InvalidInput("GPU decode needs outputs of one dtype (bf16/fp16/fp32), strides and device")
        nsec, dev = batch.nsec, self.device
        err = torch.zeros(nsec, dtype=torch.int32, device=dev)
        escapes = torch.zeros(nsec, dtype=torch.int64, device=dev)
        self._run_part(batch, 0, nsec, outs, err, escapes)
        if check:
            bad = torch.stack([err, (escapes != batch.n_exc).to(torch.int32)], 1).cpu().numpy()
            for k, (code, count_bad) in enumerate(bad):
                if code or count_bad:
                    why = [m for b, m in _ERRORS.items() if code & b] or ["exception count does not match"]
                    raise CorruptStream(f"cachegen section {k}: {'; '.join(why)}")

    def _run_part(self, batch: DecodeBatch, a: int, b: int, outs: list[torch.Tensor], err: torch.Tensor,
                  escapes: torch.Tensor) -> None:
        """Sections ``[a, b)`` of a batch (the kernels see them as a batch of their own)."""
        lay = self.layers(batch.layer_start, batch.num_layers)
        p = self.profile
        s_n, g, t, nsec, nl = lay.num_streams, p.stream_channels, batch.num_tokens, b - a, batch.num_layers
        n, ss, dev = t * g, slice(a * s_n, b * s_n), self.device
        zout = torch.empty(s_n * nsec * n, dtype=torch.float64, device=dev)
        esc_cnt = torch.empty(nsec * s_n, dtype=torch.int32, device=dev)
        cap = max(1, batch.total_exc)
        esc_rec = torch.full((2 * cap,), -1, dtype=torch.int64, device=dev)
        esc_n = torch.zeros(nsec, dtype=torch.int32, device=dev)
        n_exc = batch.n_exc[a:b]
        exc_pre = torch.cumsum(n_exc, 0) - n_exc
        i32 = np.int32
        streams = (batch.buf, batch.word_off[ss], batch.word_cnt[ss], batch.state_off[ss], batch.raw_off[ss])
        if lay.smem:  # one block per stream type and up to 32 sections (one warp each): tables loaded once
            warps = min(_DECODE_WARPS, nsec)
            self._launch("rans_decode_smem", (_blocks(nsec, warps), s_n), (
                *streams, self.sym_tab, self.enc, i32(self.alphabet), lay.uniq, i32(lay.uniq.shape[1]), lay.coef,
                lay.wpre, lay.stepi, zout, esc_cnt, esc_rec, esc_n, n_exc, exc_pre, err[a:b], i32(nsec), i32(s_n),
                i32(t), i32(g)), shared_mem=lay.smem, block=32 * warps)
        else:
            self._launch("rans_decode", _blocks(nsec * s_n * 32), (
                *streams, self.dec, lay.tidmap, lay.wpre, self.lo, lay.stepi, zout, esc_cnt, esc_rec, esc_n,
                n_exc, exc_pre, err[a:b], i32(nsec), i32(s_n), i32(t), i32(g)))
        per_sec = esc_cnt.view(nsec, s_n)
        escapes[a:b] = per_sec.sum(1)
        esc_base = (torch.cumsum(per_sec, 1) - per_sec).to(torch.int64)
        self._launch("esc_fix", _blocks(cap), (
            batch.buf, batch.exc_off[a:b], n_exc, esc_rec, i32(cap), esc_base, lay.stepi, zout, err[a:b],
            i32(nsec), i32(s_n), i32(t), i32(g)))
        back = torch.bmm(zout.view(s_n, nsec * t, g), lay.inv)
        ptrs = torch.tensor([o.data_ptr() for o in outs[a:b]], dtype=torch.int64).to(dev, non_blocking=True)
        st = outs[0].stride()
        self._launch("dec_epilogue", (s_n * nsec, _blocks(t, 8)), (
            back, batch.buf, batch.km_off[a:b], batch.vb_off[a * nl:b * nl], lay.mean, lay.weight64,
            np.float64(2.0 ** -(self.level.step_shift + 13)), ptrs, *(np.int64(x) for x in st),
            i32(_DTYPES[outs[0].dtype]), i32(nsec), i32(s_n), i32(t), i32(g), i32(p.channels), i32(p.head_dim)),
            block=min(_THREADS, -(-g // 32) * 32))

    def decode(self, sections, num_layers: int, num_tokens: int, layer_start: int, outs: list[torch.Tensor]) -> None:
        self.run(self.prepare(sections, num_layers, num_tokens, layer_start, outs[0].element_size()), outs)

    # -- encode ----------------------------------------------------------------------------------------------
    def encode(self, kvs: list[torch.Tensor], layer_start: int) -> list[memoryview]:
        """Encode sections ``kvs`` (each ``[layers, 2, tokens, heads, dim]`` on this device, all one shape).

        Returns one memoryview per section over one pinned host buffer (bytes identical to the CPU encoder's)."""
        p, dev = self.profile, self.device
        nl, _, t = kvs[0].shape[:3]
        c, g = p.channels, p.stream_channels
        lay = self.layers(layer_start, nl)
        s_n, nsec, n = lay.num_streams, len(kvs), t * g
        i32 = np.int32
        x = torch.empty((nsec, nl, 2, t, c), dtype=torch.float32, device=dev)
        for k, kv in enumerate(kvs):
            x[k].view(nl, 2, t, p.num_kv_heads, p.head_dim).copy_(kv)
        err = torch.zeros(1, dtype=torch.int32, device=dev)
        km = torch.empty((nsec, nl, c), dtype=torch.float32, device=dev)
        km_bits = torch.empty((nsec, nl, c), dtype=torch.int16, device=dev)
        if p.chunk_key_mean:
            self._launch("enc_keymean", _blocks(nsec * nl * c), (x, km, km_bits, i32(nsec), i32(nl), i32(t), i32(c)))
        if t >= 2:
            norms = torch.empty((nsec, nl, t), dtype=torch.float64, device=dev)
            self._launch("enc_norms", _blocks(nsec * nl * t), (x, norms, i32(nsec), i32(nl), i32(t), i32(c)))
            vflag_dev = sink_flags(norms, torch.from_numpy(lay.sink_ratio).to(dev)).to(torch.uint8)
        else:
            vflag_dev = torch.zeros((nsec, nl), dtype=torch.uint8, device=dev)
        big = torch.empty(s_n * nsec * n, dtype=torch.float64, device=dev)
        self._launch("enc_forward", nsec * nl * 2 * t, (
            x, km, lay.mean, lay.weight, np.float64(2.0 ** p.input_shift), i32(p.chunk_key_mean), big, err,
            i32(nsec), i32(nl), i32(t), i32(c), i32(g)))
        del x
        y = torch.bmm(big.view(s_n, nsec * t, g), lay.fwd)
        del big
        sym = torch.empty(nsec * s_n * n, dtype=torch.uint8, device=dev)
        low = torch.empty(nsec * s_n * n, dtype=torch.int16, device=dev)
        zesc = torch.empty(nsec * s_n * n, dtype=torch.int32, device=dev)
        self._launch("enc_symbols", (s_n * nsec, _blocks(n, 4 * _THREADS)), (
            y, lay.scale, vflag_dev, lay.tidmap, self.raw_bits_dev, self.lo, self.size, sym, low, zesc,
            i32(nsec), i32(s_n), i32(t), i32(g), i32(nl)))
        del y
        cap = -(-n // 32) * 32
        scratch = torch.empty(nsec * s_n * cap, dtype=torch.int16, device=dev)
        states = torch.empty(nsec * s_n * 32, dtype=torch.int32, device=dev)
        counts = torch.empty((2, nsec * s_n), dtype=torch.int32, device=dev)  # words, escapes per stream
        self._launch("rans_encode", _blocks(nsec * s_n * 32), (
            sym, self.enc, i32(self.alphabet), lay.tidmap, scratch, i32(cap), states, counts[0], counts[1], err,
            i32(nsec), i32(s_n), i32(t), i32(g)))
        counts_h, esc_h = counts.cpu().numpy().reshape(2, nsec, s_n).astype(np.int64)
        vflag = vflag_dev.cpu().numpy().astype(bool)
        exc_counts = esc_h.sum(axis=1)
        code = int(err.item())
        if code & 64:
            raise InvalidInput(f"{self.codec.name}: KV holds NaN or Inf; use the lossless codec for such data")
        if code:
            raise InvalidInput("symbol has zero frequency in its table")
        # section sizes and placement (sections back to back in one buffer)
        itemsize = kvs[0].element_size()
        runs = (t * lay.bits_per_token + 7) // 8
        raw_total = int(runs.sum())
        nverb = vflag.sum(axis=1)
        head = (16 + -(-nl // 4) * 4 + nverb * 2 * c * itemsize + (2 * nl * c if p.chunk_key_mean else 0)
                + 4 * s_n + 128 * s_n)
        prefix = head + 4 * exc_counts
        sizes = prefix + raw_total + 2 * counts_h.sum(axis=1)
        start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        outb = torch.empty(int(sizes.sum()), dtype=torch.uint8, device=dev)
        run_pre = np.concatenate([[0], np.cumsum(runs)[:-1]])
        raw_dst = (start + prefix)[:, None] + run_pre[None, :]
        word_dst = (start + prefix + raw_total)[:, None] + 2 * (np.cumsum(counts_h, axis=1) - counts_h)
        self._launch("raw_pack", nsec * s_n, (low, lay.wpre, self._dev(raw_dst.ravel()), outb, i32(s_n), i32(t),
                                              i32(g)))
        self._launch("gather_words", nsec * s_n, (scratch, i32(cap), counts[0], self._dev(word_dst.ravel()), outb))
        esc_dst = (start + head)[:, None] + 4 * (np.cumsum(esc_h, axis=1) - esc_h)
        self._launch("esc_gather", _blocks(nsec * s_n * 32), (sym, zesc, counts[1], self._dev(esc_dst.ravel()), outb,
                                                              i32(nsec), i32(s_n), i32(n)))
        host = torch.empty(outb.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(outb)
        hnp = host.numpy()
        states_h = states.cpu().numpy().view(np.uint32).reshape(nsec, s_n * 32)
        km_h = km_bits.cpu().numpy()
        verb_idx = np.flatnonzero(vflag.any(axis=1))
        sinks = {}
        if len(verb_idx):
            tok0 = torch.stack([kvs[k][:, :, 0] for k in verb_idx]).contiguous().cpu()
            sinks = {k: tok0[i].view(torch.uint8).numpy().reshape(nl, -1) for i, k in enumerate(verb_idx)}
        for k in range(nsec):
            parts = [_HEAD.pack(1, int(p.chunk_key_mean), nl, t, s_n, int(exc_counts[k])),
                     _pad4(vflag[k].astype(np.uint8).tobytes())]
            parts += [sinks[k][i].tobytes() for i in np.flatnonzero(vflag[k])]
            if p.chunk_key_mean:
                parts.append(km_h[k].astype("<i2").tobytes())
            parts.append(counts_h[k].astype("<u4").tobytes())
            parts.append(states_h[k].astype("<u4").tobytes())
            blob = b"".join(parts)
            assert len(blob) == head[k]
            hnp[start[k]:start[k] + len(blob)] = np.frombuffer(blob, np.uint8)
        mv = memoryview(hnp)
        return [mv[start[k]:start[k] + sizes[k]] for k in range(nsec)]


def sink_flags(norms: torch.Tensor, sink_ratio: torch.Tensor) -> torch.Tensor:
    """Which layers store token 0 verbatim: ``norms [..., layers, T]`` (float64, T >= 2), the CPU path's
    ``norms[:, 0] < sink_ratio * np.median(norms, axis=1)`` on the device (numpy's median: the middle value, or
    the mean ``(a + b) / 2`` of the two middle ones), so the flags are identical and need no host round trip."""
    t = norms.shape[-1]
    ordered = norms.sort(dim=-1).values
    mid = ordered[..., t // 2]
    median = mid if t % 2 else (ordered[..., t // 2 - 1] + mid) / 2
    return norms[..., 0] < sink_ratio * median


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _parse(view: memoryview, nl: int, t: int, c: int, s_n: int, itemsize: int, key_mean: bool, n: int,
           raw_total: int) -> dict:
    """Offsets of a section's parts, with the CPU decoder's checks (CorruptStream on any mismatch)."""
    size = len(view)
    if size < _HEAD.size:
        raise CorruptStream("cachegen section shorter than its header")
    version, flags, n_layers, n_tokens, n_streams, n_exc = _HEAD.unpack_from(view, 0)
    if version != 1 or flags != int(key_mean) or n_layers != nl or n_tokens != t or n_streams != s_n \
            or n_exc > nl * 2 * t * c:
        raise CorruptStream("cachegen section header does not match the chunk, level or profile")
    pos = _HEAD.size
    if pos + nl > size:
        raise CorruptStream("cachegen section truncated")
    vflags = np.frombuffer(view, np.uint8, nl, pos)
    if np.any(vflags > 1):
        raise CorruptStream("bad verbatim flags")
    pos += -(-nl // 4) * 4
    verbatim = {}
    for layer in np.flatnonzero(vflags):
        verbatim[int(layer)] = pos
        pos += 2 * c * itemsize
    keymeans = -1
    if flags & 1:
        keymeans = pos
        pos += 2 * nl * c
    if pos + 4 * s_n > size:
        raise CorruptStream("cachegen section truncated")
    counts = np.frombuffer(view, "<u4", s_n, pos).astype(np.int64)
    pos += 4 * s_n
    states = pos
    pos += 128 * s_n
    exceptions = pos
    pos += 4 * n_exc
    raw = pos
    pos += raw_total
    if pos + 2 * int(counts.sum()) != size or np.any(counts > n + 2):
        raise CorruptStream("cachegen section length does not match its stream table")
    return {"counts": counts, "states": states, "exceptions": exceptions, "raw": raw, "words": pos,
            "verbatim": verbatim, "keymeans": keymeans, "n_exc": n_exc}


@functools.cache
def _stream(ptr: int, device_index: int):
    """A CuPy handle of torch's stream ``ptr`` (kernels run in torch's stream order)."""
    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device_index)


def for_codec(codec, device: torch.device | str) -> GpuCacheGen:
    """The codec's GPU state on ``device`` (built once per codec and device)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _lock:
        cache = codec.__dict__.setdefault("_gpu_cache", {})
        if device not in cache:
            cache[device] = GpuCacheGen(codec, device)
        return cache[device]
