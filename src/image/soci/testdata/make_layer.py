#!/usr/bin/python3
"""Writes layer.tar (PAX, by Python's tarfile) and layer.tar.gz (zlib level 6), the
layer of the soci-snapshotter fixture (src/image/soci/soci_fixture.rs)."""
import io
import random
import tarfile
import zlib

random.seed(7)
WORDS = ["".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(2, 9)))
         for _ in range(3000)]


def text(n):
    out, size = [], 0
    while size < n:
        w = random.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return (" ".join(out))[:n].encode()


def add(t, name, kind=tarfile.REGTYPE, data=b"", **kw):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mtime = kw.get("mtime", 1700000000)
    ti.mode = kw.get("mode", 0o644)
    ti.uid, ti.gid = kw.get("uid", 0), kw.get("gid", 0)
    ti.uname = ti.gname = "root"
    ti.linkname = kw.get("link", "")
    ti.pax_headers = kw.get("pax", {})
    ti.devmajor, ti.devminor = kw.get("dev", (0, 0))
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


with tarfile.open("layer.tar", "w", format=tarfile.PAX_FORMAT) as t:
    add(t, "./", tarfile.DIRTYPE, mode=0o755)
    add(t, "./etc/", tarfile.DIRTYPE, mode=0o755)
    add(t, "./etc/hostname", data=b"soci-fixture\n")
    add(t, "./usr/", tarfile.DIRTYPE, mode=0o755)
    add(t, "./usr/share/", tarfile.DIRTYPE, mode=0o755)
    add(t, "./usr/share/words.txt", data=text(150000), uid=1000, gid=1000, mode=0o640)
    add(t, "./usr/share/" + "long-name-" * 12 + ".txt", data=text(3000))
    add(t, "./usr/share/caps", data=b"#!/bin/sh\n", mode=0o755,
        pax={"SCHILY.xattr.user.note": "hello", "SCHILY.xattr.security.capability": "\x01\x00\x00\x02"})
    add(t, "./usr/share/more.txt", data=text(60000), mtime=1600000000)
    add(t, "./etc/link", tarfile.SYMTYPE, link="../usr/share/words.txt", mode=0o777)
    add(t, "./etc/hard", tarfile.LNKTYPE, link="./etc/hostname")
    add(t, "./etc/fifo", tarfile.FIFOTYPE)
    add(t, "./etc/null", tarfile.CHRTYPE, dev=(1, 3), mode=0o666)
    add(t, "./usr/share/tail.txt", data=b"the end\n")

with open("layer.tar", "rb") as f:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    gz = c.compress(f.read()) + c.flush()
with open("layer.tar.gz", "wb") as f:
    f.write(gz)
