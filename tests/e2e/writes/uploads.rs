//! `uploads/`: cp commits a blob on close with bounded memory, digest names must match,
//! out-of-order writes are EINVAL, uploads are independent, descriptors a child inherits
//! do not commit; and under faults from the test proxy, a cut PATCH is resumed and a
//! registry that stays down fails close and commits nothing.

use super::*;

#[test]
fn cp_into_uploads_commits_blobs_with_bounded_memory() {
    const CACHE_MIB: u64 = 32;
    const CHUNK_MIB: u64 = 8;
    let (registry, mnt) = app_registry(&["--cache-size", "32MiB", "--chunk-size", "8MiB"]);
    let local = scratch();

    let small = noise(MIB, 11);
    let small_digest = sha256_digest(&small);
    let out = cp(
        &local_file(&local, "small.bin", &small),
        &mnt.path("team/app/uploads/small.bin"),
    );
    assert_success(&out, "cp of 1 MiB into uploads/");
    assert_linked(&mnt, "team/app/uploads/small.bin", &small_digest);
    assert_eq!(get_blob(&registry, "team/app", &small_digest), small);
    // Through the symlink, i.e. blobs/<digest> of the mount.
    assert_eq!(
        fs::read(mnt.path("team/app/uploads/small.bin")).unwrap(),
        small
    );

    // cp -p also sets mode, owner and times on the file it wrote: all accepted.
    let out = tool(
        "cp",
        [
            OsStr::new("-p"),
            local.path().join("small.bin").as_os_str(),
            mnt.path("team/app/uploads/small-again.bin").as_os_str(),
        ],
    );
    assert_success(&out, "cp -p into uploads/");
    assert_linked(&mnt, "team/app/uploads/small-again.bin", &small_digest);

    let big_path = {
        let big = noise(300 * MIB, 12);
        local_file(&local, "big.bin", &big)
    };
    let big_digest = sha256_of_file(&big_path);
    let sampler = RssSampler::start(mnt.pid());
    let out = cp(&big_path, &mnt.path("team/app/uploads/big.bin"));
    let peak = sampler.stop();
    eprintln!("regfs during the 300 MiB cp: {peak:?}");
    assert_success(&out, "cp of 300 MiB into uploads/");
    assert_linked(&mnt, "team/app/uploads/big.bin", &big_digest);
    let head = common::http(
        registry.addr,
        "HEAD",
        &format!("/v2/team/app/blobs/{big_digest}"),
        &[],
        &[],
    );
    assert_eq!(head.status, 200, "the registry has the 300 MiB blob");
    assert_eq!(head.header("content-length"), Some("314572800"));
    assert_eq!(
        head.header("docker-content-digest"),
        Some(big_digest.as_str())
    );
    assert_eq!(
        sha256_of_file(&mnt.path(&format!("team/app/blobs/{big_digest}"))),
        big_digest,
        "reading the blob back through the mount"
    );

    let bound_mib = CACHE_MIB + 4 * CHUNK_MIB + 64;
    assert!(peak.samples > 0, "no RSS sample of pid {}", mnt.pid());
    assert!(
        peak.peak_mib() <= bound_mib,
        "regfs peaked at {} MiB (VmRSS max {} KiB over {} samples, VmHWM {} KiB) while cp wrote \
         300 MiB; bound: cache 32 MiB + 4 chunks of 8 MiB + 64 MiB = {bound_mib} MiB",
        peak.peak_mib(),
        peak.max_rss_kib,
        peak.samples,
        peak.hwm_kib
    );
}

#[test]
fn digest_names_must_match_the_content() {
    let (registry, mnt) = app_registry(&[]);
    let local = scratch();

    // uploads/<right digest>: committed, and linked like any upload.
    let right = noise(3 * MIB + 5, 21);
    let right_digest = sha256_digest(&right);
    let name = format!("team/app/uploads/{right_digest}");
    let out = cp(&local_file(&local, "right", &right), &mnt.path(&name));
    assert_success(&out, "cp into uploads/<its digest>");
    assert_linked(&mnt, &name, &right_digest);
    assert_eq!(get_blob(&registry, "team/app", &right_digest), right);

    // uploads/<wrong digest>: cp fails on close, nothing is committed under either digest.
    let wrong = noise(2 * MIB, 22);
    let claimed = sha256_digest(b"not the content");
    let name = format!("team/app/uploads/{claimed}");
    let out = cp(&local_file(&local, "wrong", &wrong), &mnt.path(&name));
    assert_failure(
        &out,
        "cp into uploads/<another digest>",
        "Input/output error",
    );
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&wrong)),
        404
    );
    assert_eq!(blob_status(registry.addr, "team/app", &claimed), 404);
    assert_not_linked(&mnt, &name);

    // blobs/<right digest> written directly: uploaded and served.
    let blob = noise(MIB + 3, 23);
    let blob_digest = sha256_digest(&blob);
    let path = mnt.path(&format!("team/app/blobs/{blob_digest}"));
    let out = cp(&local_file(&local, "blob", &blob), &path);
    assert_success(&out, "cp into blobs/<its digest>");
    assert_eq!(get_blob(&registry, "team/app", &blob_digest), blob);
    assert_eq!(fs::read(&path).unwrap(), blob);

    // blobs/<wrong digest>: fails, nothing committed.
    let other = noise(MIB, 24);
    let claimed = sha256_digest(b"something else");
    let out = cp(
        &local_file(&local, "other", &other),
        &mnt.path(&format!("team/app/blobs/{claimed}")),
    );
    assert_failure(&out, "cp into blobs/<another digest>", "Input/output error");
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&other)),
        404
    );
    assert_eq!(blob_status(registry.addr, "team/app", &claimed), 404);

    // rsync's way: a temp file, then rename onto the name; the rename reports the outcome.
    let good = noise(MIB / 2, 25);
    let good_digest = sha256_digest(&good);
    let temp = mnt.path(&format!("team/app/blobs/.{good_digest}.Xa81Qz"));
    write_file(&temp, &good).expect("write a temp file in blobs/");
    fs::rename(&temp, mnt.path(&format!("team/app/blobs/{good_digest}")))
        .expect("rename the temp file onto its digest");
    assert_eq!(get_blob(&registry, "team/app", &good_digest), good);

    let bad = noise(MIB / 2, 26);
    let claimed = sha256_digest(b"yet another thing");
    let temp = mnt.path("team/app/blobs/.bad.Yb72Rw");
    write_file(&temp, &bad).expect("write a temp file in blobs/");
    assert_errno(
        fs::rename(&temp, mnt.path(&format!("team/app/blobs/{claimed}"))),
        libc::EIO,
        "rename of a temp file onto a digest it does not have",
    );
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&bad)),
        404
    );
    assert_eq!(blob_status(registry.addr, "team/app", &claimed), 404);
}

#[test]
fn out_of_order_writes_fail_with_einval() {
    let (registry, mnt) = app_registry(&[]);
    let data = noise(256 << 10, 31);
    let (first, second) = data.split_at(128 << 10);
    let file = File::create(mnt.path("team/app/uploads/gappy")).expect("create in uploads/");
    file.write_all_at(first, 0).expect("write at 0");
    file.write_all_at(second, first.len() as u64)
        .expect("pwrite where the previous write ended");
    let end = data.len() as u64;
    assert_errno(
        file.write_at(b"after a gap", end + MIB as u64),
        libc::EINVAL,
        "pwrite past the end (a gap)",
    );
    assert_errno(
        file.write_at(b"rewrite", 0),
        libc::EINVAL,
        "pwrite over bytes already written",
    );
    assert_errno(
        file.write_at(b"rewrite", end - 7),
        libc::EINVAL,
        "pwrite over the last bytes written",
    );
    // What the writer meant is not what was streamed: never committed, and the log says why.
    let closed = close(file);
    assert!(
        closed.is_err(),
        "close after out-of-order writes: {closed:?}"
    );
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&data)),
        404
    );
    assert_not_linked(&mnt, "team/app/uploads/gappy");
    let log = mnt.log();
    assert!(
        log.contains("sequential"),
        "the log does not say the writes must be sequential:\n{log}"
    );
}

#[test]
fn several_uploads_at_once_are_independent() {
    let (registry, mnt) = app_registry(&["--chunk-size", "1MiB"]);
    let contents = [
        noise(5 * MIB, 41),
        noise(3 * MIB + 1, 42),
        noise(7 * MIB - 9, 43),
    ];
    let mut files: Vec<File> = (0..contents.len())
        .map(|i| {
            File::create(mnt.path(&format!("team/app/uploads/part-{i}")))
                .expect("create in uploads/")
        })
        .collect();
    // Round robin, 256 KiB at a time: every upload has chunks in flight at once.
    let piece = 256 << 10;
    for offset in (0..7 * MIB).step_by(piece) {
        for (file, content) in files.iter_mut().zip(&contents) {
            if offset < content.len() {
                let end = content.len().min(offset + piece);
                file.write_all(&content[offset..end]).expect("write");
            }
        }
    }
    for file in files.drain(..).rev() {
        close(file).expect("close commits the upload");
    }
    for (i, content) in contents.iter().enumerate() {
        let digest = sha256_digest(content);
        assert_linked(&mnt, &format!("team/app/uploads/part-{i}"), &digest);
        assert_eq!(
            &get_blob(&registry, "team/app", &digest),
            content,
            "part-{i}"
        );
    }
}

/// A program that starts another process while it writes (any multi-threaded writer whose
/// other threads spawn, e.g. this test harness) hands the child a copy of the descriptor,
/// which the child closes at exec: the kernel sends FUSE a flush for that close too. Only
/// the writer's own close may commit.
#[test]
fn a_child_closing_an_inherited_descriptor_does_not_commit() {
    let (registry, mnt) = app_registry(&[]);
    let data = noise(2 * MIB, 45);
    let (first, second) = data.split_at(MIB);
    let mut file = File::create(mnt.path("team/app/uploads/forked")).expect("create");
    file.write_all(first).expect("write the first half");
    // fork + exec: the child's copy of the (close-on-exec) descriptor is closed at exec.
    let status = Command::new("true").status().expect("run true");
    assert!(status.success());
    file.write_all(second)
        .expect("write the second half after a child process started");
    close(file).expect("close commits the whole file");
    let digest = sha256_digest(&data);
    assert_linked(&mnt, "team/app/uploads/forked", &digest);
    assert_eq!(get_blob(&registry, "team/app", &digest), data);
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(first)),
        404,
        "the first half alone was committed"
    );
}

/// The same before the first write: a child started right after the file was created
/// closes its copy while nothing is written yet (what made uploads of other tests' files
/// commit empty when they ran beside tests that spawn). Only the opener's close commits.
#[test]
fn a_child_closing_its_copy_before_the_first_write_does_not_commit() {
    let (registry, mnt) = app_registry(&[]);
    let data = noise(MIB, 46);
    let mut file = File::create(mnt.path("team/app/uploads/early-fork")).expect("create");
    let status = Command::new("true").status().expect("run true");
    assert!(status.success());
    file.write_all(&data)
        .expect("write after a child closed its copy of the descriptor");
    close(file).expect("close commits the file");
    let digest = sha256_digest(&data);
    assert_linked(&mnt, "team/app/uploads/early-fork", &digest);
    assert_eq!(get_blob(&registry, "team/app", &digest), data);
    let empty = sha256_digest(b"");
    assert_eq!(
        blob_status(registry.addr, "team/app", &empty),
        404,
        "an empty blob was committed"
    );
}

#[test]
fn a_patch_cut_mid_upload_is_resumed() {
    common::require_tools();
    let registry = Registry::start();
    push_tiny_image(&registry, "team/app", "base", 1);
    // The third PATCH (at 2 MiB) loses its connection after the registry saw its head only:
    // distribution 2.8 can resume that (README, "Uploads (registry side)").
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            cut_patches: 1,
            cut_patch_forward: 0,
            cut_patch_after: 2,
            ..ProxyRules::default()
        },
    );
    let mnt = Mount::start(&proxy.url(), &["--chunk-size", "1MiB"]);
    let local = scratch();
    let data = noise(5 * MIB + 777, 51);
    let digest = sha256_digest(&data);
    let out = cp(
        &local_file(&local, "data", &data),
        &mnt.path("team/app/uploads/resumed.bin"),
    );
    assert_success(&out, "cp through a cut PATCH");
    assert_eq!(
        proxy.faults_left(),
        0,
        "the PATCH was cut: {:#?}",
        proxy.requests()
    );
    assert_linked(&mnt, "team/app/uploads/resumed.bin", &digest);
    assert_eq!(get_blob(&registry, "team/app", &digest), data);
    assert_eq!(
        proxy.requests_matching("POST /v2/team/app/blobs/uploads/"),
        1,
        "resumed, not restarted: {:#?}",
        proxy.requests()
    );
}

#[test]
fn a_registry_that_stays_down_fails_close_and_commits_nothing() {
    common::require_tools();
    let registry = Registry::start();
    push_tiny_image(&registry, "team/app", "base", 1);
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let mnt = Mount::start(&proxy.url(), &["--chunk-size", "8MiB", "--timeout", "10s"]);

    // Less than a chunk is written while the registry is up; it goes down before close.
    let data = noise(3 * MIB, 61);
    let mut file = File::create(mnt.path("team/app/uploads/down.bin")).expect("create");
    file.write_all(&data)
        .expect("write (buffered in the daemon)");
    proxy.set_upstream_down(true);
    assert_errno(close(file), libc::EIO, "close while the registry is down");

    // cp while it is still down.
    let local = scratch();
    let more = noise(2 * MIB, 62);
    let out = cp(
        &local_file(&local, "more", &more),
        &mnt.path("team/app/uploads/down-too.bin"),
    );
    assert!(!out.status.success(), "cp succeeded with the registry down");

    proxy.set_upstream_down(false);
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&data)),
        404
    );
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&more)),
        404
    );
    assert_not_linked(&mnt, "team/app/uploads/down.bin");
    assert_not_linked(&mnt, "team/app/uploads/down-too.bin");
}
