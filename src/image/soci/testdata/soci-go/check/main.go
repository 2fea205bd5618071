// Reads a zTOC regfs wrote with soci-snapshotter's ztoc package, as soci-snapshotter
// would: unmarshal, check span digests and max span id against the zinfo, verify each
// file's tar header where the zTOC says it is, and extract each regular file from the
// gzip layer through the zinfo checkpoints; compare with the tar.
package main

import (
	"archive/tar"
	"bytes"
	_ "crypto/sha256"
	"fmt"
	"os"

	"github.com/awslabs/soci-snapshotter/ztoc"
	"github.com/awslabs/soci-snapshotter/ztoc/compression"
	"github.com/opencontainers/go-digest"
)

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func main() {
	gz, tarPath, ztocPath := os.Args[1], os.Args[2], os.Args[3]
	zb, err := os.ReadFile(ztocPath)
	must(err)
	z, err := ztoc.Unmarshal(bytes.NewReader(zb))
	must(err)
	fmt.Println("version", z.Version, "tool", z.BuildToolIdentifier, "files", len(z.FileMetadata), "spans", z.MaxSpanID+1)
	layer, err := os.ReadFile(gz)
	must(err)
	tarBytes, err := os.ReadFile(tarPath)
	must(err)
	zinfo, err := z.Zinfo()
	must(err)
	if zinfo.MaxSpanID() != z.MaxSpanID || int(z.MaxSpanID)+1 != len(z.SpanDigests) {
		panic("max span id")
	}
	for i := compression.SpanID(0); i <= z.MaxSpanID; i++ {
		start, end := zinfo.StartCompressedOffset(i), zinfo.EndCompressedOffset(i, z.CompressedArchiveSize)
		if digest.FromBytes(layer[start:end]) != z.SpanDigests[i] {
			panic(fmt.Sprintf("span %d (%d..%d) digest", i, start, end))
		}
	}
	fmt.Println("span digests ok")
	for _, f := range z.FileMetadata {
		r := tar.NewReader(bytes.NewReader(tarBytes[f.TarHeaderOffset:f.UncompressedOffset]))
		h, err := r.Next()
		must(err)
		if h.Name != f.Name || h.Size != int64(f.UncompressedSize) || !h.ModTime.Equal(f.ModTime) ||
			h.Mode != f.Mode || h.Uid != f.UID || h.Gid != f.GID || h.Linkname != f.Linkname {
			panic(fmt.Sprintf("header of %q does not match: %+v", f.Name, h))
		}
		if f.Type != "reg" {
			continue
		}
		got, err := z.ExtractFromTarGz(gz, f.Name)
		must(err)
		want := tarBytes[f.UncompressedOffset : f.UncompressedOffset+f.UncompressedSize]
		if got != string(want) {
			panic("content of " + f.Name)
		}
		fmt.Printf("%s: %d bytes ok (header, ExtractFromTarGz)\n", f.Name, len(want))
	}
	// As soci-snapshotter's span manager reads: each span decoded on its own from its
	// compressed bytes and its checkpoint.
	var stream []byte
	for i := compression.SpanID(0); i <= z.MaxSpanID; i++ {
		start, end := zinfo.StartCompressedOffset(i), zinfo.EndCompressedOffset(i, z.CompressedArchiveSize)
		ustart, uend := zinfo.StartUncompressedOffset(i), zinfo.EndUncompressedOffset(i, z.UncompressedArchiveSize)
		data, err := zinfo.ExtractDataFromBuffer(layer[start:end], uend-ustart, ustart, i)
		must(err)
		stream = append(stream, data...)
	}
	if !bytes.Equal(stream, tarBytes[:len(stream)]) || len(stream) != int(z.UncompressedArchiveSize) {
		panic("span-by-span decoding")
	}
	fmt.Println("every span decoded on its own:", len(stream), "bytes ok")
}
