#!/usr/bin/env python3
"""Writes hostile image layers for tests/e2e/image.rs: python3 hostile_layers.py OUT_DIR.

Each case is OUT_DIR/<case>.layer (the blob) and OUT_DIR/<case>.type (its media type).
Made with Python's tarfile/gzip/zlib, plus hand-written zstd frames, so that nothing of
regfs's own code made them.
"""
import gzip
import io
import os
import struct
import sys
import tarfile
import zlib

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"


def member(tar, name, data=b"", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def names():
    """Names that try to leave the view, and entries that cannot be shown."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        member(tar, "../../escape.txt", b"escaped")
        member(tar, "/abs/file.txt", b"absolute")
        member(tar, "ok/../../up.txt", b"up")
        nul = tarfile.TarInfo("nul-placeholder")
        nul.pax_headers = {"path": "nul\x00name"}
        tar.addfile(nul, io.BytesIO(b""))
        member(tar, "dup.txt", b"first")
        member(tar, "dup.txt", b"second")
        member(tar, "hl", type=tarfile.LNKTYPE, linkname="missing/target")
        member(tar, "sym", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        member(tar, "x" * 300, b"too long a name")
        member(tar, "plainfile", b"a file")
        member(tar, "plainfile/child", b"under a file")
        member(tar, "d", type=tarfile.DIRTYPE, mode=0o755)
        member(tar, "d/f", b"fine")
        member(tar, "ok.txt", b"ok")
    return GZIP, gzip.compress(buf.getvalue())


def huge_claim():
    """A header that claims a terabyte, then the stream ends."""
    info = tarfile.TarInfo("huge")
    info.size = 1 << 40
    head = info.tobuf(tarfile.GNU_FORMAT)
    return GZIP, gzip.compress(head + b"\x01" * 1024)


def valid_layer():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(50):
            member(tar, f"f{i}", os.urandom(20_000))
    return gzip.compress(buf.getvalue())


def truncated():
    whole = valid_layer()
    return GZIP, whole[: len(whole) // 2]


def corrupt():
    whole = bytearray(valid_layer())
    for i in range(len(whole) // 2, len(whole) // 2 + 64):
        whole[i] ^= 0xA5
    return GZIP, bytes(whole)


def not_gzip():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        member(tar, "plain", b"not compressed at all")
    return GZIP, buf.getvalue()


def not_tar():
    return GZIP, gzip.compress(os.urandom(100_000))


def unknown_type():
    return "application/vnd.example.not-a-layer", b"whatever this is"


def zstd_bomb():
    """A few MiB of zstd (RLE blocks) that claims a 64 GiB file of zeros."""
    info = tarfile.TarInfo("bomb")
    info.size = 64 << 30
    head = info.tobuf(tarfile.GNU_FORMAT)
    out = bytearray(b"\x28\xb5\x2f\xfd")  # magic
    out += bytes([0x00, 10 << 3])  # no content size; window 2^20
    out += struct.pack("<I", len(head) << 3)[:3] + head  # a raw block
    block = 128 << 10
    blocks = info.size // block
    rle = struct.pack("<I", (block << 3) | (1 << 1))[:3] + b"\x00"
    out += rle * (blocks - 1)
    out += struct.pack("<I", (block << 3) | (1 << 1) | 1)[:3] + b"\x00"  # last
    return ZSTD, bytes(out)


def gzip_bomb(size=2 << 30):
    """Gigabytes of zeros in a couple of MiB: valid, and decoding it must stay small."""
    info = tarfile.TarInfo("zeros")
    info.size = size
    head = info.tobuf(tarfile.GNU_FORMAT)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = bytearray(c.compress(head) + c.flush(zlib.Z_FULL_FLUSH))
    mib = bytes(1 << 20)
    first = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    assert first == again, "full-flushed chunks repeat"
    out += first + again + again * (size // (1 << 20) - 2)
    out += c.compress(bytes(1024)) + c.flush(zlib.Z_FULL_FLUSH)  # end of archive
    out += b"\x03\x00"  # a final, empty, fixed-Huffman block
    crc = zlib.crc32(head)
    for _ in range(size // (1 << 20)):
        crc = zlib.crc32(mib, crc)
    crc = zlib.crc32(bytes(1024), crc)
    total = len(head) + size + 1024
    out += struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF)
    return GZIP, bytes(out)


CASES = {
    "names": names,
    "huge-claim": huge_claim,
    "truncated": truncated,
    "corrupt": corrupt,
    "not-gzip": not_gzip,
    "not-tar": not_tar,
    "unknown-type": unknown_type,
    "zstd-bomb": zstd_bomb,
    "gzip-bomb": gzip_bomb,
}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, make in CASES.items():
        media_type, blob = make()
        with open(os.path.join(out, name + ".layer"), "wb") as f:
            f.write(blob)
        with open(os.path.join(out, name + ".type"), "w") as f:
            f.write(media_type)


if __name__ == "__main__":
    main()
