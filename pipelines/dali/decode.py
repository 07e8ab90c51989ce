"""DALI's image decoder: its options, and which files it may be fed.

A file DALI's decoders cannot read must never reach them: some (a GIF named .jpg, a
truncated JPEG) crash the process instead of failing. `dali_format` keeps out what the first
and last bytes give away; `dali_unreadable` asks DALI itself about the rest, with as few
pipelines as the failures need.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fastdeit.data.folder import ImageIndex

try:  # DALI is a Linux-only dependency (pipelines/dali.py says so once).
    from nvidia.dali import fn, pipeline_def, types
except ImportError:  # pragma: no cover - exercised only where DALI is absent
    fn = None


def decoder_options(device: str, hw_decode: bool = False) -> dict:
    """The image decoder's device and options. On the GPU ("mixed"), nvJPEG's hardware
    decoder takes a share of each batch chosen by position in the per-rank batch, so which
    decoder an image meets (and its last bits) would depend on the world size: off unless
    asked for (data.hw_decode), every image then goes through the CUDA decoder."""
    if device != "gpu":
        return {"device": "cpu"}
    return {"device": "mixed", **({} if hw_decode else {"hw_decoder_load": 0.0})}



# Leading bytes of the formats DALI's decoders read. A file in any other format (a GIF named
# .jpg) never reaches them: fed to the decoder it can crash the process, not just fail.
_DALI_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  ",
               b"\xffO\xffQ", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")

# A pipeline whose run failed is kept alive to the end of the process: destroying it while
# other pipelines run crashes this DALI version (seen on the CPU with truncated files).
FAILED: list = []


def _blank_jpeg(size: tuple[int, int]) -> np.ndarray:
    """A grey JPEG: what a batch is fed in place of a file when no readable file is left."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (128, 128, 128)).save(buf, "JPEG")
    return np.frombuffer(buf.getvalue(), np.uint8)


BLANK_SIZE = (64, 64)
BLANK = _blank_jpeg(BLANK_SIZE)


def dali_format(data: np.ndarray) -> bool:
    """Whether DALI may be fed a file: a format its decoders read (judged from the first
    bytes) and, for a JPEG, an end-of-image marker near its end. A truncated JPEG makes the
    decoder fail, and after such failures this DALI sometimes crashes the process: files it
    would fail on are kept from it, replaced like unreadable ones."""
    head = data[:12].tobytes()
    if head.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" in data[-1024:].tobytes()
    return head.startswith(_DALI_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _refused(files: list[np.ndarray], size: int, device_id: int | None) -> list[int]:
    """Positions in `files` DALI fails to decode, `size` at a time: as few pipelines as the
    failures need (a failed pipeline cannot run again), a failed batch checked file by file."""
    chunks = [files[k:k + size] for k in range(0, len(files), size)]
    bad, c = [], 0
    while c < len(chunks):
        batches = iter(chunks[c:])

        @pipeline_def
        def graph(batches=batches):
            data = fn.external_source(source=lambda: next(batches), batch=True)
            return fn.decoders.image(data, output_type=types.RGB, adjust_orientation=False,
                                     **decoder_options("gpu" if device_id is not None else "cpu"))

        pipe = graph(batch_size=size, num_threads=2, device_id=device_id, prefetch_queue_depth=1, seed=0,
                     exec_pipelined=False, exec_async=False)  # one batch at a time: a failure is this batch's
        pipe.build()
        try:
            while c < len(chunks):
                pipe.run()
                c += 1
        except RuntimeError:
            FAILED.append(pipe)
            bad += [c] if size == 1 else [c * size + i for i in _refused(chunks[c], 1, device_id)]
            c += 1
    return bad


def dali_unreadable(index: ImageIndex, rows: list[int], device_id: int | None = None, batch: int = 64,
                    progress: Callable[[int, int], None] | None = None) -> list[int]:
    """Rows of `index` whose file DALI refuses to decode (a GIF named .jpg, a truncated scan).
    PIL may read what DALI refuses and the other way round, so a DALI run asks DALI."""
    if fn is None:
        raise RuntimeError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    bad = []
    for k in range(0, len(rows), batch * 16):
        chunk = rows[k:k + batch * 16]
        files = {i: index.read(i) for i in chunk}
        bad += [i for i in chunk if not dali_format(files[i])]
        ok = [i for i in chunk if dali_format(files[i])]
        bad += [ok[j] for j in _refused([files[i] for i in ok], batch, device_id)]
        if progress is not None:
            progress(min(k + batch * 16, len(rows)), len(rows))
    return sorted(bad)
