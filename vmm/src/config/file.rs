//! Reading the `--config` TOML file into a [`PartialConfig`].
//!
//! The interesting part is error reporting: toml's own `Display` is a
//! multi-line snippet with carets, which does not fit the one-line error
//! convention, so it is rebuilt here from the message and byte span.

use std::fs;
use std::path::Path;

use super::layer::PartialConfig;
use super::ConfigError;

/// Reads and parses `path`; relative paths inside it are resolved against
/// the file's directory.
pub(super) fn read(path: &Path) -> Result<PartialConfig, ConfigError> {
    let text = fs::read_to_string(path).map_err(|cause| ConfigError::ConfigRead {
        path: path.to_path_buf(),
        cause,
    })?;
    let base = path.parent().unwrap_or_else(|| Path::new(""));
    Ok(parse(&text, path)?.resolve_paths(base))
}

/// Parses TOML `text`; `path` is only used in error messages.
pub(super) fn parse(text: &str, path: &Path) -> Result<PartialConfig, ConfigError> {
    toml::from_str(text).map_err(|err| {
        let (line, key) = err
            .span()
            .map_or((None, None), |span| locate(text, span.start));
        ConfigError::ConfigParse {
            path: path.to_path_buf(),
            line,
            key,
            message: one_line(err.message()),
        }
    })
}

/// Joins a possibly multi-line parser message into one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The 1-based line containing byte `offset`, and the key assigned on that
/// line if it has the `key = value` shape.
fn locate(text: &str, offset: usize) -> (Option<usize>, Option<String>) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line_no = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let key = text.get(start..end).and_then(line_key).map(str::to_string);
    (Some(line_no), key)
}

/// The key a line is about: `key = value`, or a `[table]` header.
fn line_key(line: &str) -> Option<&str> {
    let line = line.trim();
    let key = match line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
        Some(table) => table,
        None => line.split_once('=')?.0,
    };
    Some(key.trim()).filter(|key| is_bare_key(key))
}

/// TOML bare keys (plus dots for dotted keys); anything else on the left of
/// `=` is not something worth echoing back as "the key".
fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::super::{ByteSize, SerialConfig};
    use super::*;

    fn parse_err(text: &str) -> String {
        match parse(text, Path::new("vm.toml")) {
            Ok(cfg) => panic!("expected an error, got {cfg:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn parses_every_field() {
        let text = r#"
            kernel = "/boot/bzImage"
            initramfs = "/boot/initrd"
            cmdline = "console=ttyS0"
            cpus = 4
            memory = "2G"
            serial = "file=/tmp/guest.log"
        "#;
        let cfg = parse(text, Path::new("vm.toml")).unwrap();
        assert_eq!(cfg.kernel.as_deref(), Some(Path::new("/boot/bzImage")));
        assert_eq!(cfg.initramfs.as_deref(), Some(Path::new("/boot/initrd")));
        assert_eq!(cfg.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(cfg.cpus, Some(4));
        assert_eq!(cfg.memory, Some(ByteSize(2 << 30)));
        assert_eq!(
            cfg.serial,
            Some(SerialConfig::File("/tmp/guest.log".into()))
        );
    }

    #[test]
    fn unknown_key_is_rejected_on_one_line() {
        let msg = parse_err("kernel = \"/k\"\ncpu = 4\n");
        assert!(
            msg.starts_with(
                r#"config file "vm.toml", line 2: unknown field `cpu`, expected one of `kernel`"#
            ),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let msg = parse_err("kernel = \"/k\"\n\nmemory = \"12Q\"\n");
        assert_eq!(
            msg,
            r#"config file "vm.toml", line 3, key `memory`: unknown size suffix "Q" (use K, M, G or T)"#
        );
    }

    #[test]
    fn wrong_type_and_syntax_errors_are_one_line() {
        let msg = parse_err("cpus = \"four\"\n");
        assert!(
            msg.starts_with(r#"config file "vm.toml", line 1, key `cpus`: invalid type"#),
            "{msg}"
        );
        let msg = parse_err("cpus = 300\n");
        assert!(msg.contains("line 1, key `cpus`"), "{msg}");
        let msg = parse_err("kernel = \"/k\"\nmemory = \n");
        assert!(msg.starts_with(r#"config file "vm.toml", line 2"#), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn table_header_is_reported_as_the_key() {
        let msg = parse_err("kernel = \"/k\"\n[serial]\nfile = \"/tmp/x\"\n");
        assert_eq!(
            msg,
            r#"config file "vm.toml", line 2, key `serial`: invalid type: map, expected "stdout", "off" or "file=PATH""#
        );
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let dir = std::env::temp_dir().join(format!("p2pvmm-cfg-file-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.toml");
        fs::write(
            &file,
            "kernel = \"bzImage\"\ninitramfs = \"/abs/initrd\"\nserial = \"file=log.txt\"\n",
        )
        .unwrap();
        let cfg = read(&file);
        fs::remove_dir_all(&dir).unwrap();
        let cfg = cfg.unwrap();
        assert_eq!(cfg.kernel, Some(dir.join("bzImage")));
        assert_eq!(cfg.initramfs.as_deref(), Some(Path::new("/abs/initrd")));
        assert_eq!(cfg.serial, Some(SerialConfig::File(dir.join("log.txt"))));
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read(Path::new("/nonexistent/vm.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"config file "/nonexistent/vm.toml": No such file or directory (os error 2)"#
        );
    }
}
