//! regfs's hand-written zTOC codec against an independent one: the Python code flatc
//! generates from ztoc.fbs (Debian's flatbuffers-compiler and python3-flatbuffers,
//! installed by scripts/setup.sh), driven by ztoc_fields.py. What regfs writes is read
//! back field by field by the generated decoder, and what the generated builder writes
//! is decoded by regfs.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use super::zinfo::{GzipZinfo, WINDOW, ZinfoCheckpoint};
use super::ztoc::{FileMetadata, FileType, Zinfo, Ztoc, format_digest};

const PYTHON: &str = "/usr/bin/python3";

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/image/soci")
}

/// `flatc --python ztoc.fbs` into a fresh directory.
fn generated(dir: &Path) -> PathBuf {
    let out = dir.join("gen");
    let status = Command::new("flatc")
        .arg("--python")
        .arg("-o")
        .arg(&out)
        .arg(here().join("ztoc.fbs"))
        .status()
        .unwrap_or_else(|e| panic!("flatc not found ({e}): run scripts/setup.sh"));
    assert!(status.success(), "flatc failed on ztoc.fbs");
    let probe = Command::new(PYTHON)
        .args(["-c", "import flatbuffers"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "{PYTHON} cannot import flatbuffers: run scripts/setup.sh (python3-flatbuffers)"
    );
    out
}

fn script(args: &[&Path]) -> Vec<u8> {
    let out = Command::new(PYTHON)
        .arg(here().join("ztoc_fields.py"))
        .args(args)
        .output()
        .expect("runs python3");
    assert!(
        out.status.success(),
        "ztoc_fields.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A zTOC with every field used, odd values included.
fn rich_ztoc() -> Ztoc {
    let file = |name: &[u8], kind, offset: u64, size: u64| FileMetadata {
        name: name.into(),
        kind,
        offset,
        size,
        header_offset: 0,
        linkname: Box::default(),
        mode: 0o644,
        uid: 0,
        gid: 0,
        uname: b"root"[..].into(),
        gname: b"root"[..].into(),
        mtime: (1_700_000_000, 123_456_789),
        devmajor: 0,
        devminor: 0,
        pax: Vec::new(),
    };
    let mut files = vec![
        file(b"./", FileType::Dir, 512, 0),
        file(b"./etc/caf\xe9", FileType::Reg, 1024, 5000),
        file(b"bin/sh", FileType::Symlink, 6656, 0),
        file(b"dev/null", FileType::Char, 7168, 0),
        file(b"x/hard", FileType::Hardlink, 7680, 0),
    ];
    files[1].mode = 0o4755;
    files[1].uid = u32::MAX;
    files[1].gid = 1000;
    files[1].mtime = (-86_400, 1);
    files[1].pax = vec![
        (
            b"SCHILY.xattr.security.capability"[..].into(),
            b"\x01\x00\x00\x02"[..].into(),
        ),
        (b"SCHILY.xattr.user.empty"[..].into(), Box::default()),
        (b"path"[..].into(), b"./etc/caf\xe9"[..].into()),
    ];
    files[2].linkname = b"/usr/bin/busybox"[..].into();
    (files[3].devmajor, files[3].devminor) = (1, 3);
    files[4].linkname = b"etc/caf\xe9"[..].into();
    let mut prev_end = 0;
    for f in &mut files {
        f.header_offset = prev_end;
        prev_end = (f.offset + f.size).div_ceil(512) * 512;
    }
    let point = |input, out, bits, fill| ZinfoCheckpoint {
        input,
        out,
        bits,
        window: vec![fill; WINDOW].into(),
    };
    Ztoc {
        version: "0.9".into(),
        build_tool: "regfs test".into(),
        compressed_size: 9000,
        uncompressed_size: 10_240,
        files,
        zinfo: Zinfo::Gzip(GzipZinfo {
            span_size: 1 << 22,
            checkpoints: vec![
                point(10, 0, 0, 0),
                point(3000, 4000, 5, 7),
                point(6000, 8000, 0, 9),
            ],
        }),
        span_digests: vec![[1; 32], [2; 32], [0xab; 32]],
    }
}

/// The fields of `z` as ztoc_fields.py prints them.
fn fields(z: &Ztoc) -> Value {
    let Zinfo::Gzip(g) = &z.zinfo else {
        panic!("gzip")
    };
    let files: Vec<Value> = z
        .files
        .iter()
        .map(|f| {
            json!({
                "name": hex(&f.name), "type": hex(f.kind.name().as_bytes()),
                "offset": f.offset, "size": f.size, "linkname": hex(&f.linkname),
                "mode": f.mode, "uid": f.uid, "gid": f.gid,
                "uname": hex(&f.uname), "gname": hex(&f.gname),
                "mod_time": hex(super::mtime::format(f.mtime.0, f.mtime.1).unwrap_or_default().as_bytes()),
                "devmajor": f.devmajor, "devminor": f.devminor,
                "xattrs": f.pax.iter().map(|(k, v)| json!([hex(k), hex(v)])).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "version": hex(z.version.as_bytes()),
        "build_tool": hex(z.build_tool.as_bytes()),
        "compressed_size": z.compressed_size,
        "uncompressed_size": z.uncompressed_size,
        "files": files,
        "algorithm": 1,
        "max_span_id": g.checkpoints.len() - 1,
        "span_digests": z.span_digests.iter().map(|d| hex(format_digest(d).as_bytes())).collect::<Vec<_>>(),
        "checkpoints": hex(&g.encode()),
    })
}

#[test]
fn what_regfs_writes_the_generated_decoder_reads_field_by_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gen_dir = generated(dir.path());
    let z = rich_ztoc();
    let path = dir.path().join("ztoc");
    std::fs::write(&path, z.encode()).expect("write");
    let out = script(&[Path::new("dump"), &gen_dir, &path]);
    let got: Value = serde_json::from_slice(&out).expect("JSON");
    let want = fields(&z);
    for key in [
        "version",
        "build_tool",
        "compressed_size",
        "uncompressed_size",
        "algorithm",
        "max_span_id",
        "span_digests",
    ] {
        assert_eq!(got[key], want[key], "{key}");
    }
    for (i, (g, w)) in got["files"]
        .as_array()
        .expect("files")
        .iter()
        .zip(want["files"].as_array().expect("files"))
        .enumerate()
    {
        assert_eq!(g, w, "file {i}");
    }
    assert_eq!(got["files"].as_array().map(Vec::len), Some(5));
    assert!(
        got["checkpoints"] == want["checkpoints"],
        "the gzip_zinfo blob"
    );
}

#[test]
fn what_the_generated_builder_writes_regfs_decodes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gen_dir = generated(dir.path());
    let z = rich_ztoc();
    let (json_path, out_path) = (dir.path().join("fields.json"), dir.path().join("ztoc"));
    std::fs::write(&json_path, serde_json::to_vec(&fields(&z)).expect("JSON")).expect("write");
    script(&[Path::new("build"), &gen_dir, &json_path, &out_path]);
    let bytes = std::fs::read(&out_path).expect("read");
    let back = Ztoc::decode(&bytes).expect("regfs decodes the generated builder's zTOC");
    let mut want = z;
    want.files.iter_mut().for_each(|f| f.pax.sort());
    assert_eq!(back.files, want.files);
    assert_eq!(back.span_digests, want.span_digests);
    assert!(back.zinfo == want.zinfo, "checkpoints");
    assert_eq!(
        (back.compressed_size, back.uncompressed_size),
        (9000, 10_240)
    );
    assert_eq!(
        (back.version.as_str(), back.build_tool.as_str()),
        ("0.9", "regfs test")
    );
}
