//! Reading the `--config` TOML file into a [`PartialConfig`].
//!
//! The interesting part is error reporting: toml's own `Display` is a
//! multi-line snippet with carets, which does not fit the one-line error
//! convention, so it is rebuilt here from the message and byte span.

use std::fs;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::device::DeviceEntry;
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
        let (line, key) = err.span().map_or((None, None), |span| {
            locate(text, faulty_device_table(text, &span).unwrap_or(span).start)
        });
        ConfigError::ConfigParse {
            path: path.to_path_buf(),
            line,
            key,
            message: one_line(err.message()),
        }
    })
}

/// Just the `[[device]]` tables, each with its span.
#[derive(Deserialize)]
struct DeviceTables {
    device: Option<Spanned<Vec<Spanned<toml::Table>>>>,
}

/// toml reports an error that concerns a whole `[[device]]` table (a
/// missing key, `placement` with `switch`) at the span of the whole array,
/// i.e. at the first table. When `span` is that array, this finds the
/// table that is actually at fault.
fn faulty_device_table(text: &str, span: &Range<usize>) -> Option<Range<usize>> {
    let tables = toml::from_str::<DeviceTables>(text).ok()?.device?;
    if tables.span() != *span {
        return None;
    }
    tables.into_inner().into_iter().find_map(|table| {
        let span = table.span();
        table
            .into_inner()
            .try_into::<DeviceEntry>()
            .err()
            .map(|_| span)
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

/// The key a line is about: `key = value`, or a `[table]` or
/// `[[array-of-tables]]` header (whose errors toml reports on the header).
fn line_key(line: &str) -> Option<&str> {
    let line = line.trim();
    let key = match line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
        Some(table) => table
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(table),
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
    use super::super::{ByteSize, IommuBackendKind, Placement, SerialConfig};
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
        assert_eq!(cfg.memory.map(|m| m.size), Some(ByteSize(2 << 30)));
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
    fn devices_parse_with_every_placement() {
        let text = r#"
            kernel = "/k"

            [[device]]
            id = "gpu0"
            path = "/sys/bus/pci/devices/0000:00:03.0"
            backend = "legacy"
            placement = "root"

            [[device]]
            path = "00:04.0"
            placement = "root-port"

            [[device]]
            path = "0000:3B:00.1"
            switch = "sw0"
            backend = "legacy"

            [[device]]
            path = "/sys/bus/pci/devices/0000:00:05.0"
        "#;
        let devices = parse(text, Path::new("vm.toml")).unwrap().devices;
        let expected = [
            (
                Some("gpu0"),
                "0000:00:03.0",
                Some(IommuBackendKind::Legacy),
                Some(Placement::Root),
            ),
            (None, "0000:00:04.0", None, Some(Placement::RootPort)),
            (
                None,
                "0000:3b:00.1",
                Some(IommuBackendKind::Legacy),
                Some(Placement::Switch("sw0".into())),
            ),
            (None, "0000:00:05.0", None, None),
        ];
        assert_eq!(devices.len(), expected.len());
        for (device, (id, bdf, backend, placement)) in devices.iter().zip(expected) {
            assert_eq!(device.id.as_deref(), id);
            assert_eq!(device.path, Path::new("/sys/bus/pci/devices").join(bdf));
            assert_eq!(device.backend, backend);
            assert_eq!(device.placement, placement);
        }
    }

    /// The lab's P2P config that `resources/demo.sh` runs must stay valid.
    #[test]
    fn the_example_p2p_config_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/examples/p2p-lab.toml");
        let cfg = read(&path).unwrap().finish().unwrap();
        assert_eq!(cfg.kernel, Path::new("/l2/bzImage"));
        assert_eq!(cfg.cpus, 2);
        let devices: Vec<_> = cfg
            .devices
            .iter()
            .map(|d| (d.path.as_path(), &d.placement))
            .collect();
        // No placement given: the group's topology (a switch named after the group) decides.
        let sw0 = Placement::Switch("g0".into());
        assert_eq!(
            devices,
            [
                (Path::new("/sys/bus/pci/devices/0000:00:01.0"), &sw0),
                (Path::new("/sys/bus/pci/devices/0000:00:02.0"), &sw0)
            ]
        );
    }

    #[test]
    fn device_errors_name_the_table() {
        let kernel = "kernel = \"/k\"\n";
        let msg = parse_err(&format!(
            "{kernel}[[device]]\npath = \"00:03.0\"\n\n[[device]]\npath = \"00:04.0\"\n\
             placement = \"root\"\nswitch = \"sw0\"\n"
        ));
        assert_eq!(
            msg,
            r#"config file "vm.toml", line 5, key `device`: placement "root" conflicts with switch "sw0": give only one (switch alone puts the device behind that switch)"#
        );
        let msg = parse_err(&format!(
            "{kernel}[[device]]\npath = \"00:03.0\"\nplacement = \"switch\"\n"
        ));
        assert_eq!(
            msg,
            r#"config file "vm.toml", line 2, key `device`: placement "switch" needs the switch's name: set switch to it instead of placement"#
        );
        let msg = parse_err(&format!(
            "{kernel}[[device]]\npath = \"00:03.0\"\nbackend = \"vfio\"\n"
        ));
        assert_eq!(
            msg,
            r#"config file "vm.toml", line 4, key `backend`: unknown IOMMU backend "vfio" (use iommufd or legacy)"#
        );
        let msg = parse_err(&format!(
            "{kernel}[[device]]\npath = \"00:03.0\"\n[[device]]\nid = \"gpu0\"\n"
        ));
        assert_eq!(
            msg,
            r#"config file "vm.toml", line 4, key `device`: missing field `path`"#
        );
        let msg = parse_err(&format!(
            "{kernel}[[device]]\npath = \"00:03.0\"\nbus = 1\n"
        ));
        assert!(
            msg.starts_with(r#"config file "vm.toml", line 4: unknown field `bus`, expected one of `id`, `path`"#),
            "{msg}"
        );
        let msg = parse_err(&format!("{kernel}[device]\npath = \"00:03.0\"\n"));
        assert!(
            msg.starts_with(r#"config file "vm.toml", line 2, key `device`: invalid type: map, expected a sequence"#),
            "{msg}"
        );
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let dir = std::env::temp_dir().join(format!("p2pvmm-cfg-file-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.toml");
        fs::write(
            &file,
            "kernel = \"bzImage\"\ninitramfs = \"/abs/initrd\"\nserial = \"file=log.txt\"\n\
             [[device]]\npath = \"fake/0000:00:03.0\"\n[[device]]\npath = \"00:04.0\"\n",
        )
        .unwrap();
        let cfg = read(&file);
        fs::remove_dir_all(&dir).unwrap();
        let cfg = cfg.unwrap();
        assert_eq!(cfg.kernel, Some(dir.join("bzImage")));
        assert_eq!(cfg.initramfs.as_deref(), Some(Path::new("/abs/initrd")));
        assert_eq!(cfg.serial, Some(SerialConfig::File(dir.join("log.txt"))));
        assert_eq!(cfg.devices[0].path, dir.join("fake/0000:00:03.0"));
        assert_eq!(
            cfg.devices[1].path,
            Path::new("/sys/bus/pci/devices/0000:00:04.0")
        );
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
