//! The command line: arbitrary bytes split at NUL into arguments (not necessarily UTF-8) after
//! the program name, through `config::load_startup`, the path `main` takes (clap, then the
//! flag values' own parsers, then the defaults).
//!
//! `--config` is left out: it would make the target read whatever file the input names
//! (`/dev/zero` never ends); `config_toml` covers the file's text. Checked beyond not
//! panicking: a configuration error is one line (clap's usage errors are clap's multi-line
//! text by design); an accepted VM (with UTF-8 paths) serializes to TOML that parses back the same.

#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use p2pvmm_fuzz::assert_one_line;
use vmm::config::{self, ConfigError};

fuzz_target!(|data: &[u8]| {
    let args: Vec<OsString> = std::iter::once(OsString::from("p2pvmm"))
        .chain(
            data.split(|&b| b == 0)
                .map(|arg| OsString::from_vec(arg.to_vec())),
        )
        .collect();
    if args
        .iter()
        .any(|a| a.as_encoded_bytes().starts_with(b"--config"))
    {
        return;
    }
    match config::load_startup(args) {
        Ok(startup) => {
            let _ = startup.log_level();
            if let Some(vm) = startup.vm {
                // TOML strings are UTF-8: a path from the command line need not be, and then
                // the config has no file form (nothing but this check serializes it).
                let text = match toml::to_string(&vm) {
                    Ok(text) => text,
                    Err(e) if e.to_string().contains("invalid UTF-8") => return,
                    Err(e) => panic!("an accepted config does not serialize: {e}"),
                };
                let back = config::parse_file_text(&text, Path::new("cli.toml"))
                    .unwrap_or_else(|e| panic!("serialized config does not parse: {e}\n{text}"));
                assert_eq!(back, vm, "CLI config does not round-trip as TOML:\n{text}");
            }
        }
        Err(ConfigError::Usage(e)) => {
            let _ = e.render().to_string();
        }
        Err(e) => assert_one_line("command line", &vmm::error_chain(&e)),
    }
});
