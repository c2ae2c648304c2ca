//! The job's secret: every connection to the rendezvous store and between TCP ranks must
//! prove that it holds it (see `crate::auth`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{DistError, Interrupt};

const TOKEN_BYTES: usize = 32;
const MIN_TOKEN_LEN: usize = 16;
const MAX_TOKEN_LEN: usize = 256;

/// A fresh token: 32 bytes from the operating system's CSPRNG, as 64 hex digits.
pub fn generate_token() -> Result<String, DistError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| {
        DistError::Invalid(format!("could not get random bytes for the job token: {e}"))
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks a token given by a user (environment or file).
pub fn check_token(token: &str, source: &str) -> Result<(), DistError> {
    let ok_chars = token.bytes().all(|b| b.is_ascii_graphic());
    if token.len() < MIN_TOKEN_LEN || token.len() > MAX_TOKEN_LEN || !ok_chars {
        return Err(DistError::Invalid(format!(
            "the job token from {source} must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} printable characters without spaces \
             (e.g. `openssl rand -hex 32`)"
        )));
    }
    Ok(())
}

/// Creates `path` holding a fresh token, readable by its owner only (mode 0600). The file
/// appears complete or not at all; an existing file is an error (never overwritten).
pub fn create_token_file(path: &Path) -> Result<String, DistError> {
    let token = generate_token()?;
    let io = |what: &str, e| DistError::io(format!("{what} token file {}", path.display()), e);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        DistError::Invalid(format!("token file {}: not a file path", path.display()))
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("creating", e))?;
    let written = file
        .write_all(format!("{token}\n").as_bytes())
        .and_then(|_| file.sync_all());
    drop(file);
    // A hard link publishes the complete file, and fails if the name is taken.
    let published = written.and_then(|_| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match published {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(DistError::Invalid(format!(
                "token file {} already exists: it belongs to another job (or a previous attempt of this one); \
                 remove it or choose another ZAMBA_DIST_TOKEN_FILE",
                path.display()
            )));
        }
        Err(e) => return Err(io("writing", e)),
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(token)
}

/// Waits up to `timeout` for `path` to appear, then reads its token. Refuses a file that other
/// users can read or write.
pub fn read_token_file(path: &Path, timeout: Duration) -> Result<String, DistError> {
    wait_for_token_file(path, timeout, &Interrupt::never())
}

/// As [`read_token_file`], the wait ended early by `interrupt`.
pub(crate) fn wait_for_token_file(
    path: &Path,
    timeout: Duration,
    interrupt: &Interrupt,
) -> Result<String, DistError> {
    let deadline = Instant::now() + timeout;
    let meta = loop {
        interrupt.check(&format!(
            "waiting for the token file {} (rank 0 creates it)",
            path.display()
        ))?;
        match fs::metadata(path) {
            Ok(meta) => break meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if Instant::now() >= deadline {
                    return Err(DistError::Timeout {
                        op: format!(
                            "waiting for the token file {} (rank 0 creates it)",
                            path.display()
                        ),
                        timeout_s: timeout.as_secs_f64(),
                        ranks: vec![0],
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(DistError::io(
                    format!("reading token file {}", path.display()),
                    e,
                ));
            }
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(DistError::Invalid(format!(
            "token file {} is accessible to other users (mode {mode:04o}): `chmod 600` it",
            path.display()
        )));
    }
    let text = fs::read_to_string(path)
        .map_err(|e| DistError::io(format!("reading token file {}", path.display()), e))?;
    let token = text.trim().to_string();
    check_token(&token, &format!("file {}", path.display()))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex_and_checked() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        check_token(&a, "test").unwrap();
        assert!(check_token("short", "test").is_err());
        assert!(check_token("with a space in the middle", "test").is_err());
    }

    #[test]
    fn token_file_is_private_exclusive_and_waited_for() {
        let dir = std::env::temp_dir().join(format!("zamba-dist-token-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let _ = fs::remove_file(&path);
        let reader = {
            let path = path.clone();
            std::thread::spawn(move || read_token_file(&path, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(200));
        let token = create_token_file(&path).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), token);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = create_token_file(&path).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        assert_eq!(read_token_file(&path, Duration::ZERO).unwrap(), token);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let open = read_token_file(&path, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(open.contains("chmod 600"), "{open}");

        let missing = read_token_file(&dir.join("absent"), Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(missing, DistError::Timeout { ref ranks, .. } if ranks == &[0]),
            "{missing}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
