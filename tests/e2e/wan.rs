//! regfs over a distant link (common/shaper.rs: 40 ms round trip, one connection held to
//! 20 MB/s): a sequential reader's stream is found rate-bound and the rest of the blob
//! is fetched by parallel block requests, with the right bytes; a grep over many
//! repositories finds every manifest. How fast is for scripts/bench.sh, not asserted.

use crate::common;

use std::fs;
use std::time::Duration;

use common::shaper::{Shape, Shaper};
use common::{Mount, Registry, noise, push_image, push_tiny_image, sha256_digest};

fn distant(registry: &Registry) -> Shaper {
    Shaper::start(
        registry.addr,
        Shape {
            rtt: Duration::from_millis(40),
            per_connection: Some(20_000_000),
            total: None,
        },
    )
    .expect("shaper")
}

#[test]
fn a_rate_bound_stream_gives_way_to_parallel_fetches() {
    common::require_tools();
    let registry = Registry::start();
    let blob = noise(48 << 20, 31);
    let (_, digests) = push_image(&registry, "team/app", "v1", &[&blob]);
    let link = distant(&registry);
    let mount = Mount::start(&link.url(), &["--no-disk-cache"]);
    let read = fs::read(mount.path(&format!("team/app/blobs/{}", digests[0]))).expect("read");
    assert_eq!(sha256_digest(&read), digests[0]);
    let log = mount.log();
    // The shaper makes the stream slow and distant whatever the machine's load.
    assert!(log.contains("rate-bound"), "{log}");
    let stats = mount.stats();
    assert!(
        stats["requests"]["blob_range"].as_u64().unwrap_or(0) >= 4,
        "{stats:#}"
    );
    mount.terminate();
}

#[test]
fn grep_over_many_repositories_through_a_distant_link() {
    common::require_tools();
    let registry = Registry::start();
    for r in 0..12 {
        push_tiny_image(&registry, &format!("many/r{r:02}"), "v1", r);
    }
    let link = distant(&registry);
    let mount = Mount::start(&link.url(), &["--no-disk-cache"]);
    let out = std::process::Command::new("grep")
        .args(["-rl", "mediaType"])
        .arg(mount.path("many"))
        .output()
        .expect("grep");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found = String::from_utf8_lossy(&out.stdout);
    for r in 0..12 {
        assert!(
            found.contains(&format!("many/r{r:02}/tags/v1/manifest.json")),
            "{found}"
        );
    }
    mount.terminate();
}
