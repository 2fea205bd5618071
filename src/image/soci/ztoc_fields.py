#!/usr/bin/python3
"""zTOCs read and written by the code flatc generates from ztoc.fbs: the independent
FlatBuffers implementation regfs's tests check its own zTOC codec against
(src/image/soci/fbs_check.rs).

  ztoc_fields.py dump GENDIR ZTOC         prints the zTOC's fields as JSON
  ztoc_fields.py build GENDIR JSON ZTOC   writes a zTOC with the fields of JSON

GENDIR holds `flatc --python ztoc.fbs` output. Byte strings are hex in the JSON.
"""
import json
import sys

sys.path.insert(0, sys.argv[2])

import flatbuffers  # noqa: E402  (Debian's python3-flatbuffers)
from ztoc import CompressionInfo, FileMetadata, TOC, Xattr, Ztoc  # noqa: E402


def hx(b):
    return (b or b"").hex()


def dump_file(m):
    return {
        "name": hx(m.Name()),
        "type": hx(m.Type()),
        "offset": m.UncompressedOffset(),
        "size": m.UncompressedSize(),
        "linkname": hx(m.Linkname()),
        "mode": m.Mode(),
        "uid": m.Uid(),
        "gid": m.Gid(),
        "uname": hx(m.Uname()),
        "gname": hx(m.Gname()),
        "mod_time": hx(m.ModTime()),
        "devmajor": m.Devmajor(),
        "devminor": m.Devminor(),
        "xattrs": [[hx(m.Xattrs(j).Key()), hx(m.Xattrs(j).Value())] for j in range(m.XattrsLength())],
    }


def dump(path):
    with open(path, "rb") as f:
        buf = f.read()
    z = Ztoc.Ztoc.GetRootAs(buf, 0)
    toc = z.Toc()
    files = [dump_file(toc.Metadata(i)) for i in range(toc.MetadataLength())] if toc else []
    ci = z.CompressionInfo()
    checkpoints = bytes(ci.Checkpoints(j) for j in range(ci.CheckpointsLength()))
    out = {
        "version": hx(z.Version()),
        "build_tool": hx(z.BuildToolIdentifier()),
        "compressed_size": z.CompressedArchiveSize(),
        "uncompressed_size": z.UncompressedArchiveSize(),
        "files": files,
        "algorithm": ci.CompressionAlgorithm(),
        "max_span_id": ci.MaxSpanId(),
        "span_digests": [hx(ci.SpanDigests(j)) for j in range(ci.SpanDigestsLength())],
        "checkpoints": checkpoints.hex(),
    }
    json.dump(out, sys.stdout)


def build_file(b, f):
    strings = {k: b.CreateString(bytes.fromhex(f[k])) for k in
               ("name", "type", "linkname", "uname", "gname", "mod_time")}
    xattrs = []
    for key, value in f["xattrs"]:
        k, v = b.CreateString(bytes.fromhex(key)), b.CreateString(bytes.fromhex(value))
        Xattr.XattrStart(b)
        Xattr.XattrAddKey(b, k)
        Xattr.XattrAddValue(b, v)
        xattrs.append(Xattr.XattrEnd(b))
    FileMetadata.FileMetadataStartXattrsVector(b, len(xattrs))
    for x in reversed(xattrs):
        b.PrependUOffsetTRelative(x)
    xv = b.EndVector()
    m = FileMetadata
    m.FileMetadataStart(b)
    m.FileMetadataAddName(b, strings["name"])
    m.FileMetadataAddType(b, strings["type"])
    m.FileMetadataAddUncompressedOffset(b, f["offset"])
    m.FileMetadataAddUncompressedSize(b, f["size"])
    m.FileMetadataAddLinkname(b, strings["linkname"])
    m.FileMetadataAddMode(b, f["mode"])
    m.FileMetadataAddUid(b, f["uid"])
    m.FileMetadataAddGid(b, f["gid"])
    m.FileMetadataAddUname(b, strings["uname"])
    m.FileMetadataAddGname(b, strings["gname"])
    m.FileMetadataAddModTime(b, strings["mod_time"])
    m.FileMetadataAddDevmajor(b, f["devmajor"])
    m.FileMetadataAddDevminor(b, f["devminor"])
    m.FileMetadataAddXattrs(b, xv)
    return m.FileMetadataEnd(b)


def build(json_path, out_path):
    with open(json_path) as f:
        z = json.load(f)
    b = flatbuffers.Builder(1024)
    files = [build_file(b, f) for f in z["files"]]
    TOC.TOCStartMetadataVector(b, len(files))
    for x in reversed(files):
        b.PrependUOffsetTRelative(x)
    mv = b.EndVector()
    TOC.TOCStart(b)
    TOC.TOCAddMetadata(b, mv)
    toc = TOC.TOCEnd(b)
    digests = [b.CreateString(bytes.fromhex(d)) for d in z["span_digests"]]
    CompressionInfo.CompressionInfoStartSpanDigestsVector(b, len(digests))
    for d in reversed(digests):
        b.PrependUOffsetTRelative(d)
    dv = b.EndVector()
    cv = b.CreateByteVector(bytes.fromhex(z["checkpoints"]))
    c = CompressionInfo
    c.CompressionInfoStart(b)
    c.CompressionInfoAddCompressionAlgorithm(b, z["algorithm"])
    c.CompressionInfoAddMaxSpanId(b, z["max_span_id"])
    c.CompressionInfoAddSpanDigests(b, dv)
    c.CompressionInfoAddCheckpoints(b, cv)
    info = c.CompressionInfoEnd(b)
    version = b.CreateString(bytes.fromhex(z["version"]))
    tool = b.CreateString(bytes.fromhex(z["build_tool"]))
    Ztoc.ZtocStart(b)
    Ztoc.ZtocAddVersion(b, version)
    Ztoc.ZtocAddBuildToolIdentifier(b, tool)
    Ztoc.ZtocAddCompressedArchiveSize(b, z["compressed_size"])
    Ztoc.ZtocAddUncompressedArchiveSize(b, z["uncompressed_size"])
    Ztoc.ZtocAddToc(b, toc)
    Ztoc.ZtocAddCompressionInfo(b, info)
    b.Finish(Ztoc.ZtocEnd(b))
    with open(out_path, "wb") as f:
        f.write(b.Output())


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(sys.argv[3])
    else:
        build(sys.argv[3], sys.argv[4])
