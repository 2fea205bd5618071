//! Where a registry may send regfs: the guard against server-side request forgery.
//!
//! A registry's answers name other URLs: redirects (blob downloads go to object storage
//! or a CDN), upload `Location`s, pagination `Link`s and token realms. A hostile or
//! compromised registry could use them to make regfs reach into the machine's own
//! network: a cloud metadata service at 169.254.169.254, an admin port on 127.0.0.1,
//! a host on the private LAN. So a URL whose host is a loopback, link-local, private or
//! unspecified IP literal, on another host than the registry's, is refused, unless the
//! registry itself is on an address of that kind (a registry on 127.0.0.1 may send
//! regfs to 127.0.0.2; one on a public address may not send it to 10.0.0.1).
//!
//! Names are judged by what they are written as: a host name that resolves to such an
//! address is not looked up here (that would need the resolver in the connector).
//! Credentials are a separate matter: they never go to another origin at all (auth.rs).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};

use tracing::warn;
use url::{Host, Url};

use crate::registry::error::{Error, Result};

/// The address ranges a registry may not point regfs at on another host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Internal {
    Loopback,
    LinkLocal,
    Private,
    Unspecified,
}

impl fmt::Display for Internal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Internal::Loopback => "loopback",
            Internal::LinkLocal => "link-local",
            Internal::Private => "private",
            Internal::Unspecified => "unspecified",
        })
    }
}

/// Which internal range `ip` is in, if any (None: a public address).
pub fn internal_kind(ip: IpAddr) -> Option<Internal> {
    match ip {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_kind(v4),
            None => v6_kind(v6),
        },
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<Internal> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some(Internal::Loopback)
    } else if ip.is_link_local() {
        Some(Internal::LinkLocal)
    // RFC 1918, and the shared space of carrier-grade NAT (RFC 6598).
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        Some(Internal::Private)
    // 0.0.0.0/8, "this network": connecting to it reaches this host.
    } else if a == 0 {
        Some(Internal::Unspecified)
    } else {
        None
    }
}

fn v6_kind(ip: Ipv6Addr) -> Option<Internal> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some(Internal::Loopback)
    } else if ip.is_unspecified() {
        Some(Internal::Unspecified)
    } else if first & 0xffc0 == 0xfe80 {
        Some(Internal::LinkLocal)
    } else if first & 0xfe00 == 0xfc00 {
        // Unique local addresses (fc00::/7).
        Some(Internal::Private)
    } else {
        None
    }
}

/// The guard of one registry: its host, and the internal ranges it is itself on.
#[derive(Clone, Debug)]
pub struct Guard {
    registry_host: Option<String>,
    registry_kinds: BTreeSet<Internal>,
}

impl Guard {
    /// For the registry at `base`. A host name is resolved once, here, to learn what
    /// kind of address the registry is on (`localhost` without asking).
    pub fn new(base: &Url) -> Guard {
        let registry_kinds = match base.host() {
            Some(Host::Ipv4(ip)) => internal_kind(IpAddr::V4(ip)).into_iter().collect(),
            Some(Host::Ipv6(ip)) => internal_kind(IpAddr::V6(ip)).into_iter().collect(),
            Some(Host::Domain(name)) if is_localhost(name) => BTreeSet::from([Internal::Loopback]),
            Some(Host::Domain(name)) => {
                let port = base.port_or_known_default().unwrap_or(443);
                (name, port)
                    .to_socket_addrs()
                    .map(|addrs| addrs.filter_map(|a| internal_kind(a.ip())).collect())
                    .unwrap_or_default()
            }
            None => BTreeSet::new(),
        };
        Guard {
            registry_host: base.host_str().map(str::to_ascii_lowercase),
            registry_kinds,
        }
    }

    /// Refuses `url` (named by the registry as a `purpose`, e.g. "redirect") if it
    /// points at an internal address on another host than the registry's; the log
    /// says which.
    pub fn check(&self, what: &str, purpose: &str, url: &Url) -> Result<()> {
        let host = url.host_str().map(str::to_ascii_lowercase);
        if host.is_some() && host == self.registry_host {
            return Ok(());
        }
        let kind = match url.host() {
            Some(Host::Ipv4(ip)) => internal_kind(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => internal_kind(IpAddr::V6(ip)),
            Some(Host::Domain(_)) | None => None,
        };
        match kind {
            Some(kind) if !self.registry_kinds.contains(&kind) => {
                let to = url.origin().ascii_serialization();
                warn!(
                    request = what,
                    "refused a {purpose} to {to}: a {kind} address on another host than the registry"
                );
                Err(Error::BadAnswer(format!(
                    "{what}: {purpose} to {to} refused ({kind} address on another host)"
                )))
            }
            _ => Ok(()),
        }
    }
}

fn is_localhost(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).expect("url")
    }

    fn kind(s: &str) -> Option<Internal> {
        internal_kind(s.parse().expect("ip"))
    }

    #[test]
    fn address_kinds() {
        assert_eq!(kind("127.0.0.1"), Some(Internal::Loopback));
        assert_eq!(kind("127.9.9.9"), Some(Internal::Loopback));
        assert_eq!(kind("::1"), Some(Internal::Loopback));
        assert_eq!(kind("169.254.169.254"), Some(Internal::LinkLocal));
        assert_eq!(kind("fe80::1"), Some(Internal::LinkLocal));
        for private in [
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            assert_eq!(kind(private), Some(Internal::Private), "{private}");
        }
        assert_eq!(kind("0.0.0.0"), Some(Internal::Unspecified));
        assert_eq!(kind("::"), Some(Internal::Unspecified));
        assert_eq!(kind("::ffff:127.0.0.1"), Some(Internal::Loopback));
        assert_eq!(kind("::ffff:10.1.2.3"), Some(Internal::Private));
        for public in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2001:db8::1",
            "203.0.113.7",
        ] {
            assert_eq!(kind(public), None, "{public}");
        }
    }

    #[test]
    fn a_public_registry_may_not_send_regfs_inside() {
        let guard = Guard {
            registry_host: Some("registry.example.com".into()),
            registry_kinds: BTreeSet::new(),
        };
        let check = |u: &str| guard.check("GET x", "redirect", &url(u));
        assert!(check("https://cdn.example.net/blob").is_ok());
        assert!(check("https://8.8.8.8/blob").is_ok());
        assert!(check("https://registry.example.com:8443/other").is_ok());
        for inside in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:2375/containers/json",
            "http://10.0.0.5/",
            "http://[::1]/",
            "http://0.0.0.0:80/",
            // The URL parser's reading of odd IPv4 forms is what is judged.
            "http://0x7f.1/",
            "http://2130706433/",
        ] {
            let e = check(inside).expect_err(inside);
            assert!(e.to_string().contains("refused"), "{e}");
        }
    }

    #[test]
    fn a_registry_inside_may_send_regfs_to_its_own_kind_only() {
        let guard = Guard::new(&url("http://127.0.0.1:5000/"));
        let check = |u: &str| guard.check("GET x", "redirect", &url(u));
        assert!(check("http://127.0.0.2:9000/bucket/blob").is_ok());
        assert!(check("http://169.254.169.254/").is_err());
        assert!(check("http://192.168.0.10/").is_err());
        let guard = Guard::new(&url("http://localhost:5000/"));
        assert!(
            guard
                .check("GET x", "redirect", &url("http://127.0.0.1:1/"))
                .is_ok()
        );
        let guard = Guard::new(&url("http://10.1.2.3:5000/"));
        assert!(
            guard
                .check("GET x", "redirect", &url("http://10.9.9.9:9000/"))
                .is_ok()
        );
        assert!(
            guard
                .check("GET x", "redirect", &url("http://127.0.0.1/"))
                .is_err()
        );
    }
}
