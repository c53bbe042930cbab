//! The Unix socket: created with mode 0600 (0660 with a group), stale sockets of dead daemons
//! replaced, live ones never stolen, peers identified with SO_PEERCRED.

use crate::{Error, Result};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Takes the daemon's lock for `path` (`<path>.lock`, an exclusive `flock` held while the
/// returned file is open), so two daemons starting together cannot both decide that a socket is
/// stale and both serve. The lock file is left in place: removing it would reopen the race.
pub fn lock(path: &Path) -> Result<std::fs::File> {
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
    // SAFETY: a valid open descriptor; flock only takes an advisory lock on it.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::invalid(
            "socket",
            format!("{} is held by another gpod (its lock {} is taken)", path.display(), lock.display()),
        ));
    }
    Ok(f)
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
    // SAFETY: umask only changes this process's file-creation mask; restored right after.
    let old = unsafe { libc::umask(mask) };
    let l = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let l = l.map_err(|e| Error::io(path, e))?;
    if let Some(gid) = gid {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::invalid("socket", "path contains NUL"))?;
        // SAFETY: valid C string; uid -1 keeps the owner.
        if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
    }
    Ok(l)
}

fn group_id(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| Error::invalid("group", "contains NUL"))?;
    // SAFETY: getgrnam returns NULL or a pointer to static storage read immediately.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        return Err(Error::invalid("group", format!("no such group {name:?}")));
    }
    Ok(unsafe { (*g).gr_gid })
}

/// The uid of the process at the other end of a connection.
pub fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// Whether `path` is still the file `bound` describes (same device and inode).
pub fn same_file(path: &Path, bound: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == bound.dev() && m.ino() == bound.ino())
}

/// This process's uid.
pub fn my_uid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::getuid() }
}
