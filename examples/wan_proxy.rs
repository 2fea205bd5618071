//! `cargo run --release --example wan_proxy -- --upstream 127.0.0.1:5000 --rtt 40ms
//! --per-connection 25MB --total 200MB`: a loopback TCP proxy that behaves like a
//! wide-area link (tests/common/shaper.rs). Prints `listening on ADDR`, then relays until
//! killed, printing `connections C requests R` whenever its counts change (scripts/
//! bench.sh counts round trips by them). Anything can sit behind it (a registry, nginx).

#[path = "../tests/common/shaper.rs"]
#[allow(dead_code)]
mod shaper;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use shaper::{Shape, Shaper};

#[derive(Parser)]
#[command(about = "A loopback TCP proxy with a WAN's round trip and rate limits")]
struct Args {
    /// Where to relay to
    #[arg(long)]
    upstream: SocketAddr,
    /// Where to listen
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Round-trip time added (half each way, and one for every new connection)
    #[arg(long, default_value = "40ms", value_parser = humantime::parse_duration)]
    rtt: Duration,
    /// Bytes per second per connection and direction (e.g. 25MB; 0: unlimited)
    #[arg(long, default_value = "0", value_parser = rate)]
    per_connection: u64,
    /// Bytes per second of all connections together, per direction (0: unlimited)
    #[arg(long, default_value = "0", value_parser = rate)]
    total: u64,
}

fn rate(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let shape = Shape {
        rtt: args.rtt,
        per_connection: (args.per_connection > 0).then_some(args.per_connection),
        total: (args.total > 0).then_some(args.total),
    };
    match Shaper::start_on(&args.listen, args.upstream, shape) {
        Ok(shaper) => {
            println!("listening on {}", shaper.addr);
            let mut shown = (0, 0);
            loop {
                let now = (shaper.connections(), shaper.requests());
                if now != shown {
                    println!("connections {} requests {}", now.0, now.1);
                    shown = now;
                }
                let _ = std::io::Write::flush(&mut std::io::stdout());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Err(e) => {
            eprintln!("wan_proxy: cannot listen on {}: {e}", args.listen);
            std::process::ExitCode::FAILURE
        }
    }
}
