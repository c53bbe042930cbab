//! The Unix socket: created with mode 0600 (0660 with a group), stale sockets of dead daemons
//! replaced, live ones never stolen, peers identified with SO_PEERCRED.

use crate::{Error, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{chown, getuid, Gid, Group};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Takes the daemon's lock for `path` (`<path>.lock`, an exclusive `flock` held while the
/// returned file is open), so two daemons starting together cannot both decide that a socket is
/// stale and both serve. The lock file is left in place: removing it would reopen the race.
pub fn lock(path: &Path) -> Result<Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock = std::path::PathBuf::from(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock)
        .map_err(|e| Error::io(&lock, e))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|_| {
        Error::invalid(
            "socket",
            format!("{} is held by another gpod (its lock {} is taken)", path.display(), lock.display()),
        )
    })
}

/// Binds `path`. An existing socket that accepts connections belongs to a live daemon: refused.
/// One that refuses them is stale: removed. Anything that is not a socket is never touched.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::invalid(
                "socket",
                format!("{} exists and is not a socket; refusing to replace it", path.display()),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::invalid("socket", format!("{} is served by a running gpod", path.display())));
        }
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        tracing::info!("removed stale socket {}", path.display());
    }
    let gid = match group {
        Some(g) => Some(group_id(g)?),
        None => None,
    };
    // The socket is created with the process umask: make it owner-only (owner+group) from birth,
    // so there is no window in which others could connect.
    let mask = if gid.is_some() { 0o117 } else { 0o177 };
    let old = umask(Mode::from_bits_truncate(mask));
    let l = UnixListener::bind(path);
    umask(old);
    let l = l.map_err(|e| Error::io(path, e))?;
    if let Some(gid) = gid {
        chown(path, None, Some(gid)).map_err(|e| Error::io(path, e.into()))?;
    }
    Ok(l)
}

fn group_id(name: &str) -> Result<Gid> {
    match Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(Error::invalid("group", format!("no such group {name:?}"))),
        Err(e) => Err(Error::invalid("group", format!("cannot look up group {name:?}: {e}"))),
    }
}

/// The uid of the process at the other end of a connection.
pub fn peer_uid(s: &UnixStream) -> Option<u32> {
    getsockopt(s, PeerCredentials).ok().map(|c| c.uid())
}

/// Whether `path` is still the file `bound` describes (same device and inode).
pub fn same_file(path: &Path, bound: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == bound.dev() && m.ino() == bound.ino())
}

/// This process's uid.
pub fn my_uid() -> u32 {
    getuid().as_raw()
}
