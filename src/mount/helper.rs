//! regfs as a mount helper, for `mount`, `/etc/fstab` and systemd.
//!
//! `mount -t fuse.regfs SOURCE DIR -o OPTS` (or an fstab line of that type, or the old
//! `regfs#SOURCE` with type `fuse`) runs `mount.fuse3`, which runs `regfs SOURCE DIR -o
//! OPTS`; `mount -t regfs` runs `/sbin/mount.regfs SOURCE DIR [-nsv] -o OPTS` when that
//! is a link to regfs. Either way the arguments are turned into `regfs mount --daemon
//! …`: every long option of `regfs mount` is an `-o key=value` (`cache_dir=/var/cache/
//! regfs`, `mirror=http://m:5000`, repeatable) or a bare `key` for a switch
//! (`allow_other`); `ro` is `--read-only`. Options that are mount's own (`rw`, `_netdev`,
//! `nofail`, `x-systemd.*`, …) are for mount and systemd and are passed over. `mount`
//! waits for the daemon's parent, which exits once the mount is ready (or has failed,
//! with the reason on stderr).

use std::ffi::OsString;
use std::path::Path;

/// Options that mean something to mount(8), systemd or the kernel's generic mount code,
/// not to regfs (FUSE mounts are nosuid,nodev anyway).
const MOUNT_OWN: &[&str] = &[
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "async",
    "sync",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "loud",
    "silent",
];

/// The `regfs mount` command line for a helper invocation, or None when `args` (all of
/// them, the program name first) are an ordinary regfs command line.
pub fn translate(args: &[OsString]) -> Option<Result<Vec<OsString>, String>> {
    let program = args.first()?;
    let name = Path::new(program).file_name()?.to_string_lossy();
    let as_helper = name.starts_with("mount.");
    let rest: Vec<String> = args[1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // `regfs SOURCE DIR …` (from mount.fuse3): the first word is no subcommand or flag.
    let from_fuse = rest.len() >= 2
        && !rest[0].starts_with('-')
        && !["mount", "cache", "snapshotter", "status", "help"].contains(&rest[0].as_str());
    if !as_helper && !from_fuse {
        return None;
    }
    Some(helper_command(program, &rest))
}

fn helper_command(program: &OsString, rest: &[String]) -> Result<Vec<OsString>, String> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut words = rest.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "-o" => options.push(words.next().ok_or("-o needs a list of options")?.to_owned()),
            // mount(8)'s own: no mtab, sloppy, verbose, fake; and the type it was run for.
            "-n" | "-s" | "-v" | "-f" => {}
            "-t" | "-N" => {
                words.next();
            }
            w if w.starts_with("-o") => options.push(w[2..].to_owned()),
            w if w.starts_with('-') => return Err(format!("unknown mount helper flag {w}")),
            w => positional.push(w.to_owned()),
        }
    }
    let [source, dir] = positional.as_slice() else {
        return Err(format!(
            "usage: {} REGISTRY MOUNTPOINT [-o key=value,...] (got {} words)",
            program.to_string_lossy(),
            positional.len()
        ));
    };
    // The old fstab form: type `fuse`, source `regfs#REGISTRY`.
    let source = source.strip_prefix("regfs#").unwrap_or(source);
    let mut out: Vec<OsString> = vec![program.clone(), "mount".into(), "--daemon".into()];
    for option in options.iter().flat_map(|o| o.split(',')) {
        out.extend(flag_of(option)?.into_iter().map(OsString::from));
    }
    out.push(source.into());
    out.push(dir.into());
    Ok(out)
}

/// The regfs flag(s) for one `-o` option (none for mount's own).
fn flag_of(option: &str) -> Result<Vec<String>, String> {
    let (key, value) = match option.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (option, None),
    };
    if key.is_empty()
        || MOUNT_OWN.contains(&key)
        || key.starts_with("x-")
        || key.starts_with("comment")
        || key == "subtype"
        || key == "fsname"
    {
        return Ok(vec![]);
    }
    if key == "ro" {
        return Ok(vec!["--read-only".into()]);
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
    {
        return Err(format!("mount option {option:?}: not a regfs option"));
    }
    let flag = format!("--{}", key.replace('_', "-"));
    if ["daemon", "help", "version"].contains(&key) {
        return Err(format!("mount option {key:?} cannot be used here"));
    }
    Ok(match value {
        Some(v) => vec![flag, v.to_owned()],
        None => vec![flag],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    fn joined(v: Vec<OsString>) -> String {
        v.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn mount_fuse3_invocations_become_regfs_mount() {
        let got = translate(&words(
            "regfs http://reg:5000 /mnt/reg -o rw,_netdev,ro,allow_other,cache_dir=/var/cache/regfs,mirror=http://m:1,mirror=http://m:2,x-systemd.automount",
        ))
        .expect("a helper call")
        .expect("valid");
        assert_eq!(
            joined(got),
            "regfs mount --daemon --read-only --allow-other --cache-dir /var/cache/regfs --mirror http://m:1 --mirror http://m:2 http://reg:5000 /mnt/reg"
        );
    }

    #[test]
    fn the_old_fstab_form_and_mount_regfs() {
        let got = translate(&words(
            "/sbin/mount.regfs regfs#reg.example /mnt/reg -n -o tag_ttl=5m -t regfs",
        ))
        .expect("a helper call")
        .expect("valid");
        assert_eq!(
            joined(got),
            "/sbin/mount.regfs mount --daemon --tag-ttl 5m reg.example /mnt/reg"
        );
    }

    #[test]
    fn ordinary_command_lines_are_left_alone() {
        assert!(translate(&words("regfs mount http://r /m")).is_none());
        assert!(translate(&words("regfs cache du")).is_none());
        assert!(translate(&words("regfs --help")).is_none());
        assert!(translate(&words("regfs -v mount http://r /m")).is_none());
        assert!(translate(&words("regfs")).is_none());
    }

    #[test]
    fn bad_helper_calls_say_why() {
        let err = |s: &str| {
            translate(&words(s))
                .expect("a helper call")
                .expect_err("invalid")
        };
        assert!(err("mount.regfs /m").contains("usage"));
        assert!(err("regfs a b -o Bad=1").contains("not a regfs option"));
        assert!(err("regfs a b -o daemon").contains("cannot be used"));
        assert!(err("regfs a b -o").contains("-o needs"));
    }
}
