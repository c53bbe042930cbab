//! gpod's trust policy: where files that clients name may live, which external verifier commands
//! may run, and which state directory the daemon accepts. Every client-supplied path and verifier
//! goes through here before the server touches the file system or spawns anything.

use crate::gpo::RunConfig;
use crate::reward::VerifierConfig;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// Roots inside which every file a client names resolves (gpod.toml `[paths]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Paths {
    /// Models, adapters and task files clients may read (default: the model cache,
    /// `$GPO_MODELS_DIR` or `~/.cache/gpo/models`).
    pub models: PathBuf,
    /// Where clients' training runs write (default: `runs/` in the state directory).
    pub runs: Option<PathBuf>,
}

impl Default for Paths {
    fn default() -> Self {
        Paths { models: crate::models::models_dir(), runs: None }
    }
}

/// Which external verifier commands clients may have the daemon run (gpod.toml `[verifier]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifierPolicy {
    /// Allow `command` verifiers at all. Default false: they run as the daemon's user.
    pub allow_commands: bool,
    /// The exact commands (program and arguments) allowed when `allow_commands` is set.
    pub commands: Vec<Vec<String>>,
}

impl VerifierPolicy {
    /// Refuses a `command` verifier unless the operator allowed exactly that command.
    pub fn check(&self, v: &VerifierConfig) -> Result<()> {
        let VerifierConfig::Command { command, .. } = v else { return Ok(()) };
        if !self.allow_commands {
            return Err(Error::invalid(
                "verifier",
                "command verifiers are disabled on this daemon (the operator enables them with \
                 [verifier] allow_commands and a command list in gpod.toml)",
            ));
        }
        if !self.commands.iter().any(|c| c == command) {
            return Err(Error::invalid("verifier", "this command is not in the daemon's [verifier] commands list"));
        }
        Ok(())
    }
}

/// Resolves a path a client named inside `root`: a relative path of plain components (no `..`,
/// no root), or an absolute one that already lies inside `root`. Symbolic links may not lead out
/// of `root` either (checked on the deepest part of the path that exists). `what` names the field.
pub fn confine(root: &Path, name: &Path, what: &'static str) -> Result<PathBuf> {
    let refuse = |why: &str| Err(Error::invalid(what, format!("{}: {why}", name.display())));
    if name.as_os_str().is_empty() {
        return refuse("empty path");
    }
    if name.components().any(|c| matches!(c, Component::ParentDir)) {
        return refuse("`..` is not allowed in paths sent to gpod");
    }
    let joined = if name.is_absolute() {
        if !name.starts_with(root) {
            return refuse(&format!("outside the daemon's directory for {what} ({})", root.display()));
        }
        name.to_path_buf()
    } else {
        root.join(name)
    };
    // Symbolic links: the deepest existing ancestor must resolve inside the resolved root.
    let real_root = root.canonicalize().map_err(|e| Error::io(root, e))?;
    let mut probe = joined.as_path();
    loop {
        if let Ok(real) = probe.canonicalize() {
            if !real.starts_with(&real_root) {
                return refuse(&format!("leads outside the daemon's directory for {what} ({})", root.display()));
            }
            break;
        }
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    Ok(joined)
}

/// Confines every path of a client's run configuration (parsed without a base directory, so
/// relative paths are still relative): the output inside `runs`, the model and task files inside
/// `models`; and checks its verifier against `policy`. Also used on restored jobs.
pub fn confine_run(cfg: &mut RunConfig, models: &Path, runs: &Path, policy: &VerifierPolicy) -> Result<()> {
    cfg.output = confine(runs, &cfg.output, "output")?;
    if let Some(m) = &cfg.model {
        cfg.model = Some(confine(models, m, "model")?);
    }
    for (p, what) in [(&mut cfg.tasks.train_file, "tasks.train_file"), (&mut cfg.tasks.eval_file, "tasks.eval_file")] {
        if let Some(f) = p {
            *p = Some(confine(models, f, what)?);
        }
    }
    policy.check(&cfg.verifier)
}

/// The default state directory: `$XDG_RUNTIME_DIR/gpod` (per-user, 0700 by the login manager),
/// else `~/.cache/gpod`, never a shared `/tmp` path.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("gpod");
    }
    crate::models::cache_dir().join("gpod")
}

/// Creates `dir` with mode 0700, or accepts an existing one only when this user owns it and no
/// one else may write to it (the daemon resumes the jobs it finds there).
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::io(dir, e))?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    let refuse = |why: String| Err(Error::invalid("state_dir", format!("{}: {why}", dir.display())));
    if !meta.is_dir() {
        return refuse("not a directory (a symbolic link is not accepted)".into());
    }
    let me = super::socket::my_uid();
    if meta.uid() != me {
        return refuse(format!("owned by uid {}, not by the daemon's user ({me}); refusing to use it", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!("mode {:o} lets other users write to it; chmod go-w it first", meta.mode() & 0o777));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        let d = std::env::temp_dir().join(format!("gpo-trust-{}", std::process::id()));
        std::fs::create_dir_all(d.join("sub")).unwrap();
        d
    }

    #[test]
    fn client_paths_stay_inside_their_root() {
        let r = root();
        assert_eq!(confine(&r, Path::new("sub/m.gguf"), "model").unwrap(), r.join("sub/m.gguf"));
        assert_eq!(confine(&r, &r.join("new/dir"), "output").unwrap(), r.join("new/dir"));
        for bad in ["../x", "sub/../../x", "/etc/passwd", ""] {
            let e = confine(&r, Path::new(bad), "model").unwrap_err().to_string();
            assert!(e.contains("model"), "{bad}: {e}");
        }
        // A link inside the root that points out of it.
        let link = r.join("escape");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        assert!(confine(&r, Path::new("escape/passwd"), "model").is_err());
        assert!(confine(&r, Path::new("escape/new/dir"), "output").is_err());
    }

    #[test]
    fn command_verifiers_need_the_operator_and_the_exact_command() {
        let cmd = VerifierConfig::Command { command: vec!["id".into()], timeout_ms: 100 };
        assert!(VerifierPolicy::default().check(&cmd).unwrap_err().to_string().contains("disabled"));
        let open = VerifierPolicy { allow_commands: true, commands: vec![vec!["python3".into(), "v.py".into()]] };
        assert!(open.check(&cmd).unwrap_err().to_string().contains("not in"));
        let ok = VerifierConfig::Command { command: vec!["python3".into(), "v.py".into()], timeout_ms: 100 };
        open.check(&ok).unwrap();
        VerifierPolicy::default().check(&VerifierConfig::Numeric).unwrap();
    }

    #[test]
    fn a_state_dir_others_can_write_is_refused() {
        let d = root().join("state");
        ensure_private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        assert!(ensure_private_dir(&d).unwrap_err().to_string().contains("other users"));
    }
}
