//! The one way this crate reads an input file and writes an output (a
//! file or a folder).
//!
//! * **Bounded reads.** [`read_bounded`] reads regular files only (a FIFO
//!   would block, a device never ends), checked before opening, and at
//!   most a given size.
//! * **Never over an input.** [`check_output`] refuses an output that is
//!   an input (same canonical path, or the same file by device and inode
//!   through another name or a hard link), and an existing output folder
//!   that holds an input (replacing it would delete the input).
//! * **One overwrite policy for files and folders.** An existing output is
//!   refused unless `force`; with `force` it is replaced only once the new
//!   one is complete.
//! * **Atomic.** Everything is written under a temporary name in the
//!   output's own folder ([`Staging`]), synced, then renamed into place and
//!   the folder synced: a reader sees the old output or the new one. A file
//!   replaces a file in one rename. A folder replacing a folder takes two
//!   renames (the old one aside, the new one in, then the old one removed);
//!   between them the path is briefly absent, never half-written.
//! * **No temporaries left behind.** A [`Staging`] removes its temporary
//!   when dropped without [`Staging::commit`] (errors, panics). Signals do
//!   not run destructors, so every temporary is also registered, and
//!   [`remove_registered_temporaries`] (which the `peft` command calls from
//!   its SIGINT/SIGTERM handler) removes them. A process killed outright
//!   (SIGKILL) leaves its temporary; temporaries are named
//!   `.peft-tmp-<pid>-<random>`, and the next [`Staging`] in the same folder
//!   removes those whose process is gone ([`remove_stale_temporaries`]).
//!
//! Temporary names are short (27 bytes), so an output name may use the
//! whole 255-byte limit of common file systems.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Refuses anything but a regular file, checked without opening it.
/// Returns its length.
///
/// # Errors
/// [`OutputError::Io`] naming `path`: it does not exist, or is a folder,
/// FIFO, device or socket.
pub fn regular_file(path: &Path) -> Result<u64, OutputError> {
    let meta = std::fs::metadata(path).map_err(io_at(path))?;
    if !meta.is_file() {
        let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
        return Err(OutputError::Io(path.to_path_buf(), e));
    }
    Ok(meta.len())
}

/// Reads a whole regular file of at most `max` bytes.
///
/// # Errors
/// [`OutputError::Io`] naming `path` for a non-regular file, one over
/// `max` bytes (checked before reading, and while reading, as a file may
/// grow), or a read error.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, OutputError> {
    let too_big = || {
        let msg = format!("larger than the {max}-byte limit for this kind of file");
        OutputError::Io(path.to_path_buf(), std::io::Error::new(std::io::ErrorKind::InvalidData, msg))
    };
    if regular_file(path)? > max {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    let f = File::open(path).map_err(io_at(path))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(f, max + 1), &mut bytes).map_err(io_at(path))?;
    if bytes.len() as u64 > max {
        return Err(too_big());
    }
    Ok(bytes)
}

/// The prefix of every temporary this crate creates.
pub const TEMP_PREFIX: &str = ".peft-tmp-";

/// Why an input cannot be read or an output written.
#[derive(Debug)]
pub enum OutputError {
    /// The output exists and `force` was not given.
    Exists(PathBuf),
    /// Writing the output would replace or delete an input.
    IsInput {
        /// The output.
        output: PathBuf,
        /// The input it would destroy.
        input: PathBuf,
    },
    /// The output exists and is not a regular file or a folder (a
    /// device, a FIFO, a socket): never replaced, even with `force`.
    NotAFile(PathBuf),
    /// A file-system error on a path.
    Io(PathBuf, std::io::Error),
}

impl std::fmt::Display for OutputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutputError::Exists(p) => write!(f, "{} already exists (pass --force to replace it)", p.display()),
            OutputError::IsInput { output, input } => {
                write!(f, "refusing to write {}: it would overwrite the input {}", output.display(), input.display())
            }
            OutputError::NotAFile(p) => write!(
                f,
                "refusing to write {}: it is not a regular file or a folder (a device, FIFO or socket), even with --force",
                p.display()
            ),
            OutputError::Io(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

impl std::error::Error for OutputError {}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> OutputError + '_ {
    move |e| OutputError::Io(path.to_path_buf(), e)
}

/// `path` made absolute with symbolic links resolved; for a path that does
/// not exist yet, its folder resolved and its name appended.
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Ok(p);
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the output path has no file name"))?;
    Ok(parent.canonicalize()?.join(name))
}

/// Checks that `output` may be written given the files read (`inputs`) and
/// `force`: see the module docs.
///
/// # Errors
/// [`OutputError::IsInput`] naming the input; [`OutputError::NotAFile`]
/// for a device, FIFO or socket (whatever `force` says);
/// [`OutputError::Exists`]; [`OutputError::Io`] if the output's folder
/// cannot be resolved.
pub fn check_output(output: &Path, inputs: &[&Path], force: bool) -> Result<(), OutputError> {
    let out = resolve(output).map_err(io_at(output))?;
    for &input in inputs {
        let Ok(inp) = input.canonicalize() else { continue };
        // Hard links: compared by identity, for regular files only (the
        // check opens both, which would block on a FIFO).
        let files = [&inp, &out].iter().all(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()));
        let same = inp.starts_with(&out) || (files && same_file::is_same_file(&inp, &out).unwrap_or(false));
        if same {
            return Err(OutputError::IsInput { output: output.to_path_buf(), input: input.to_path_buf() });
        }
    }
    if let Ok(m) = out.symlink_metadata() {
        let kind = m.file_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(OutputError::NotAFile(output.to_path_buf()));
        }
        if !force {
            return Err(OutputError::Exists(output.to_path_buf()));
        }
    }
    Ok(())
}

/// Temporaries of this process not yet committed or removed.
static REGISTERED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn registered() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    REGISTERED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes every temporary this process has registered and not committed:
/// for a signal handler, which runs no destructors. Returns how many were
/// removed.
pub fn remove_registered_temporaries() -> usize {
    let paths = std::mem::take(&mut *registered());
    paths.iter().filter(|p| remove_any(p)).count()
}

fn remove_any(p: &Path) -> bool {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).is_ok(),
        Ok(_) => std::fs::remove_file(p).is_ok(),
        Err(_) => false,
    }
}

/// Whether process `pid` is alive, where the platform lets us know
/// (`/proc`); `None` elsewhere.
fn process_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    proc.join("self").exists().then(|| proc.join(pid.to_string()).exists())
}

/// Removes the temporaries in `dir` left by processes that no longer run
/// (named `.peft-tmp-<pid>-...`, the pid not alive). Does nothing where
/// liveness cannot be known (no `/proc`). A pid reused by a new process
/// keeps its stale temporary until that process ends. Returns how many
/// were removed.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && process_alive(pid) == Some(false) && remove_any(&entry.path()) {
            removed += 1;
        }
    }
    removed
}

/// An output being written under a temporary name beside it.
#[derive(Debug)]
pub struct Staging {
    tmp: PathBuf,
    dst: PathBuf,
    dir: bool,
    committed: bool,
}

impl Staging {
    fn new(dst: &Path, dir: bool) -> Result<Self, OutputError> {
        let parent = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        remove_stale_temporaries(parent);
        let prefix = format!("{TEMP_PREFIX}{}-", std::process::id());
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix).rand_bytes(8);
        // Outputs get the modes `File::create` and `create_dir` would give
        // (0666 / 0777 under the umask), not a temporary's private 0600.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            b.permissions(std::fs::Permissions::from_mode(if dir { 0o777 } else { 0o666 }));
        }
        // Keep the name, drop tempfile's own guard: this type removes it.
        let tmp = if dir {
            b.tempdir_in(parent).map_err(io_at(parent))?.keep()
        } else {
            b.tempfile_in(parent).map_err(io_at(parent))?.into_temp_path().keep().map_err(|e| io_at(parent)(e.error))?
        };
        registered().push(tmp.clone());
        Ok(Self { tmp, dst: dst.to_path_buf(), dir, committed: false })
    }

    /// Starts writing the file `dst`: an empty temporary file beside it.
    ///
    /// # Errors
    /// [`OutputError::Io`] if it cannot be created.
    pub fn file(dst: &Path) -> Result<Self, OutputError> {
        Self::new(dst, false)
    }

    /// Starts writing the folder `dst`: an empty temporary folder beside it.
    ///
    /// # Errors
    /// [`OutputError::Io`] if it cannot be created.
    pub fn dir(dst: &Path) -> Result<Self, OutputError> {
        Self::new(dst, true)
    }

    /// The temporary: the file to write, or the folder to fill.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished output into place (the caller has synced what it
    /// wrote), replacing an existing `dst` only if `force`, and syncs the
    /// folder.
    ///
    /// # Errors
    /// [`OutputError::Exists`] if `dst` appeared meanwhile and not `force`;
    /// [`OutputError::Io`], also if `dst` is a folder and this a file or
    /// the reverse (`force` replaces like with like). The temporary is
    /// removed on error.
    pub fn commit(mut self, force: bool) -> Result<(), OutputError> {
        let exists = self.dst.symlink_metadata().is_ok();
        if exists && !force {
            return Err(OutputError::Exists(self.dst.clone()));
        }
        let io = io_at(&self.dst);
        if exists && self.dst.is_dir() != self.dir {
            let what = if self.dir { "a file; a folder" } else { "a folder; a file" };
            let e = std::io::Error::new(std::io::ErrorKind::AlreadyExists, format!("it is {what} cannot replace it"));
            return Err(io(e));
        }
        if exists && self.dir {
            // A rename cannot replace a non-empty folder: move the old
            // output aside first, restore it if the second rename fails.
            let aside = Staging::new(&self.dst, false)?;
            std::fs::remove_file(&aside.tmp).map_err(&io)?;
            std::fs::rename(&self.dst, &aside.tmp).map_err(&io)?;
            if let Err(e) = std::fs::rename(&self.tmp, &self.dst) {
                std::fs::rename(&aside.tmp, &self.dst).ok();
                return Err(io(e));
            }
            // `aside` (the old output) is removed when it drops.
        } else {
            std::fs::rename(&self.tmp, &self.dst).map_err(&io)?;
        }
        self.committed = true;
        registered().retain(|p| p != &self.tmp);
        let parent = self.dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Ok(d) = File::open(parent) {
            d.sync_all().ok();
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            remove_any(&self.tmp);
            registered().retain(|p| p != &self.tmp);
        }
    }
}

/// Writes `bytes` to the file `path` through a [`Staging`]: written,
/// synced, renamed into place.
///
/// # Errors
/// [`OutputError`]s; nothing is left behind on error.
pub fn write_file(path: &Path, bytes: &[u8], force: bool) -> Result<(), OutputError> {
    let staging = Staging::file(path)?;
    write_synced(staging.path(), path, bytes)?;
    staging.commit(force)
}

/// Writes `bytes` to the file `path` (created or truncated) and syncs it;
/// errors name `shown`, the output the caller is staging (not the
/// temporary they are removed with).
///
/// # Errors
/// [`OutputError::Io`] naming `shown`.
pub fn write_synced(path: &Path, shown: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let io = io_at(shown);
    let mut f = File::create(path).map_err(&io)?;
    std::io::Write::write_all(&mut f, bytes).map_err(&io)?;
    f.sync_all().map_err(&io)
}

/// Writes `files` (name, contents) into the folder `dir` through a
/// [`Staging`]: each written and synced, the folder renamed into place.
///
/// `check` runs on the finished temporary folder before it is committed
/// (for example reading it back with the reader that will load it); its
/// error aborts the write.
///
/// # Errors
/// [`OutputError`]s, `check`'s error; nothing is left behind on error.
pub fn write_dir<E: From<OutputError>>(
    dir: &Path,
    files: &[(&str, &[u8])],
    force: bool,
    check: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let staging = Staging::dir(dir)?;
    for (name, data) in files {
        write_synced(&staging.path().join(name), &dir.join(name), data)?;
    }
    check(staging.path())?;
    Ok(staging.commit(force)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("peft-output-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn an_output_that_is_an_input_is_refused_by_path_link_and_folder() {
        let d = scratch("input");
        let input = d.join("in.bin");
        std::fs::write(&input, b"x").unwrap();
        // Same path, a path through `..`, a hard link, a folder holding it.
        let via = d.join("sub");
        std::fs::create_dir(&via).unwrap();
        let link = d.join("link.bin");
        std::fs::hard_link(&input, &link).unwrap();
        for out in [input.clone(), via.join("..").join("in.bin"), link, d.clone()] {
            let e = check_output(&out, &[&input], true).unwrap_err();
            assert!(matches!(e, OutputError::IsInput { .. }), "{out:?}: {e}");
        }
        // Without force, an existing unrelated output is refused; with it, allowed.
        let other = d.join("other.bin");
        std::fs::write(&other, b"y").unwrap();
        assert!(matches!(check_output(&other, &[&input], false), Err(OutputError::Exists(_))));
        check_output(&other, &[&input], true).unwrap();
        check_output(&d.join("new.bin"), &[&input], false).unwrap();
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    #[cfg(unix)]
    fn devices_and_fifos_are_never_replaced_even_with_force() {
        // As root, `--out /dev/null --force` would have replaced the
        // system's /dev/null with a regular file (issue 27, class 5).
        for force in [false, true] {
            let e = check_output(Path::new("/dev/null"), &[], force).unwrap_err();
            assert!(matches!(e, OutputError::NotAFile(_)), "{e}");
        }
        let dir = scratch("fifo");
        let fifo = dir.join("pipe");
        if std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
            assert!(matches!(check_output(&fifo, &[], true), Err(OutputError::NotAFile(_))));
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn force_replaces_files_and_folders_only_when_committed() {
        let d = scratch("force");
        let f = d.join("out.bin");
        write_file(&f, b"old", false).unwrap();
        assert!(matches!(write_file(&f, b"new", false), Err(OutputError::Exists(_))));
        assert_eq!(std::fs::read(&f).unwrap(), b"old");
        write_file(&f, b"new", true).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"new");

        let dir = d.join("out.dir");
        write_dir::<OutputError>(&dir, &[("a", b"1")], false, |_| Ok(())).unwrap();
        // A failing check leaves the old folder and no temporary.
        let e = write_dir::<OutputError>(&dir, &[("a", b"2")], true, |p| Err(OutputError::Exists(p.into())));
        assert!(e.is_err());
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"1");
        write_dir::<OutputError>(&dir, &[("b", b"3")], true, |_| Ok(())).unwrap();
        assert_eq!(names(&dir), ["b"]);
        assert_eq!(names(&d), ["out.bin", "out.dir"]);
        std::fs::remove_dir_all(&d).ok();
    }

    /// Outputs are created with the usual modes, not a temporary's 0600.
    #[cfg(unix)]
    #[test]
    fn outputs_get_the_modes_plain_creation_gives() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("modes");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        std::fs::File::create(d.join("plain")).unwrap();
        std::fs::create_dir(d.join("plain-dir")).unwrap();
        write_file(&d.join("out"), b"x", false).unwrap();
        write_dir::<OutputError>(&d.join("out-dir"), &[], false, |_| Ok(())).unwrap();
        assert_eq!(mode(&d.join("out")), mode(&d.join("plain")));
        assert_eq!(mode(&d.join("out-dir")), mode(&d.join("plain-dir")));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn temporaries_are_short_registered_and_removed() {
        let d = scratch("temps");
        // A 255-byte output name: the temporary's own name stays short.
        let long = d.join("n".repeat(255));
        write_file(&long, b"x", false).unwrap();
        assert_eq!(std::fs::read(&long).unwrap(), b"x");

        let s = Staging::file(&d.join("a")).unwrap();
        let t = Staging::dir(&d.join("b")).unwrap();
        assert!(s.path().file_name().unwrap().len() <= 32);
        assert!(s.path().exists() && t.path().is_dir());
        // Registered for the signal handler (which tests/cli.rs runs: it
        // would remove other tests' temporaries here), unregistered on drop.
        let (sp, tp) = (s.path().to_path_buf(), t.path().to_path_buf());
        assert!(registered().contains(&sp) && registered().contains(&tp));
        drop((s, t));
        assert!(!registered().contains(&sp) && !registered().contains(&tp));
        assert!(!sp.exists() && !tp.exists());
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        if process_alive(std::process::id()) != Some(true) {
            return; // no /proc: liveness unknown, nothing is removed (documented)
        }
        let d = scratch("stale");
        // A pid above Linux's maximum (2^22) cannot be alive.
        let dead = d.join(format!("{TEMP_PREFIX}4194999-abcdefgh"));
        let alive = d.join(format!("{TEMP_PREFIX}1-abcdefgh"));
        let ours = d.join(format!("{TEMP_PREFIX}{}-abcdefgh", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("shard"), b"partial").unwrap();
        std::fs::write(&alive, b"").unwrap();
        std::fs::write(&ours, b"").unwrap();
        let _s = Staging::file(&d.join("out")).unwrap();
        assert!(!dead.exists());
        assert!(alive.exists() && ours.exists());
        std::fs::remove_dir_all(&d).ok();
    }
}
